import pytest
import torch

from comfyui_moa.moa_core.errors import MoAError
from comfyui_moa.moa_core.subject import Subject, blank_background, blend_subjects, masked_subjects, to_rgb


def subject(seed: int, dim: int = 8) -> Subject:
    generator = torch.Generator().manual_seed(seed)
    return Subject(torch.randn(dim, generator=generator), torch.full((1, 224, 224, 3), float(seed)), dim)


def test_to_rgb_expands_grey_drops_alpha_and_adds_a_batch():
    grey = torch.rand(2, 10, 12, 1)
    assert torch.equal(to_rgb(grey, "x")[..., 2], grey[..., 0])
    rgba = torch.rand(1, 10, 12, 4)
    assert torch.equal(to_rgb(rgba, "x"), rgba[..., :3])
    assert to_rgb(torch.rand(10, 12, 3), "x").shape == (1, 10, 12, 3)


@pytest.mark.parametrize("shape", [(1, 10, 12, 2), (10, 12), (1, 4, 4, 3)])
def test_to_rgb_names_the_input_on_bad_shapes(shape):
    with pytest.raises(MoAError, match=r"node.image: expected an IMAGE"):
        to_rgb(torch.rand(shape), "node.image")


def test_blank_background_keeps_the_subject_and_replaces_the_rest():
    image = torch.full((1, 8, 8, 3), 0.25)
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0  # top half at a quarter of the image's resolution
    out = blank_background(image, mask)
    assert torch.equal(out[:, :3], image[:, :3])
    assert not torch.equal(out[:, 5:], image[:, 5:])
    assert torch.equal(out, blank_background(image, mask))  # the noise is seeded: runs repeat


def test_a_masked_subject_is_cut_to_its_box_and_padded_square_like_a_training_crop():
    image = torch.rand(2, 20, 16, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 20, 16)
    mask[0, 4:12, 5:9] = 1.0  # 8 high, 4 wide: black bars of 2 on either side
    mask[1, 10:13, 2:14] = 1.0  # 3 high, 12 wide: bars above (4) and below (5)
    tall, wide = masked_subjects(image, mask, "node.mask")
    assert tall.shape == (3, 8, 8) and wide.shape == (3, 12, 12)
    assert torch.equal(tall[:, :, 2:6], image[0, 4:12, 5:9].movedim(-1, 0))
    assert not tall[:, :, :2].any() and not tall[:, :, 6:].any()
    assert torch.equal(wide[:, 4:7], image[1, 10:13, 2:14].movedim(-1, 0))
    assert not wide[:, :4].any() and not wide[:, 7:].any()


def test_an_empty_mask_is_refused_by_name():
    mask = torch.ones(2, 8, 8)
    mask[1] = 0.0
    with pytest.raises(MoAError, match="node.mask: the mask is empty for image 2; paint the subject white"):
        masked_subjects(torch.rand(2, 8, 8, 3), mask, "node.mask")


def test_blend_is_linear_between_the_subjects():
    a, b = subject(1), subject(2)
    assert torch.equal(blend_subjects(a, b, 0.0).embedding, a.embedding)
    assert torch.equal(blend_subjects(a, b, 1.0).embedding, b.embedding)
    torch.testing.assert_close(blend_subjects(a, b, 0.25).embedding, 0.75 * a.embedding + 0.25 * b.embedding)


def test_blend_refuses_subjects_of_different_encoders():
    with pytest.raises(MoAError, match="different image encoders"):
        blend_subjects(subject(1, 8), subject(2, 16), 0.5)
