import math

import torch

from comfyui_moa.moa_core.align import similarity_transform, template_in_canvas, warp_affine

POINTS = torch.tensor([[38.0, 52.0], [74.0, 51.0], [56.0, 72.0], [42.0, 92.0], [71.0, 92.0]])


def transformed(points, angle, scale, shift):
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]])
    return scale * points @ rotation.T + torch.tensor(shift)


def test_similarity_transform_recovers_a_known_rotation_scale_and_shift():
    moved = transformed(POINTS, angle=0.3, scale=1.7, shift=(12.0, -5.0))
    matrix = similarity_transform(POINTS, moved)
    mapped = POINTS @ matrix[:, :2].T + matrix[:, 2]
    torch.testing.assert_close(mapped, moved, atol=1e-4, rtol=0)
    torch.testing.assert_close(matrix[0, 0], torch.tensor(1.7 * math.cos(0.3)), atol=1e-5, rtol=0)


def test_similarity_transform_is_a_least_squares_fit_under_noise_and_never_reflects():
    mirrored = POINTS * torch.tensor([-1.0, 1.0])  # a mirror image cannot be matched by a similarity
    matrix = similarity_transform(POINTS, mirrored)
    assert torch.det(matrix[:, :2]) > 0


def test_warp_affine_moves_a_pixel_where_the_matrix_sends_it():
    image = torch.zeros(40, 50, 3)
    image[10, 20] = 1.0  # (x, y) = (20, 10): pixel coordinates, as landmarks and OpenCV use them
    matrix = torch.tensor([[2.0, 0.0, 3.0], [0.0, 2.0, 1.0]])  # x' = 2x + 3, y' = 2y + 1
    out = warp_affine(image, matrix, 64)
    assert out.shape == (64, 64, 3)
    assert divmod(int(out[..., 0].argmax()), 64) == (21, 43)
    torch.testing.assert_close(out[21, 43], torch.ones(3), atol=1e-5, rtol=0)


def test_identity_warp_keeps_the_image():
    image = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(warp_affine(image, identity, 32), image, atol=1e-5, rtol=0)


def test_template_in_canvas_scales_with_margin_and_stays_centred():
    template = torch.tensor([[0.0, 0.0], [112.0, 112.0]])
    tight = template_in_canvas(template, 112.0, 224, margin=0.0)
    torch.testing.assert_close(tight, template * 2)
    roomy = template_in_canvas(template, 112.0, 224, margin=0.5)
    torch.testing.assert_close(roomy, torch.tensor([[56.0, 56.0], [168.0, 168.0]]))
