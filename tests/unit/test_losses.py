"""The training losses against values worked out by hand on tensors small enough to check on paper."""

import pytest
import torch

from comfyui_moa.moa_core import masked_diffusion_loss, object_loss, prior_map, router_loss, router_subject_loss
from comfyui_moa.moa_core.losses import resize_mask, v_weights

EXACT = {"atol": 1e-6, "rtol": 0}  # sums of a few float32 values


def test_resize_mask_gives_the_covered_fraction_of_each_cell():
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0] = 1.0  # one pixel of the top-left 2x2 cell
    mask[0, 2:, 2:] = 1.0  # the whole bottom-right cell
    expected = torch.tensor([[[0.25, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(resize_mask(mask, (2, 2)), expected, **EXACT)


def test_masked_diffusion_loss_is_the_mean_squared_error_over_subject_elements():
    prediction = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the top row is the subject
    # subject elements: channel 0 -> 1, 2; channel 1 -> 0, 1: squares 1 + 4 + 0 + 1 over 4 elements
    torch.testing.assert_close(masked_diffusion_loss(prediction, target, mask), torch.tensor(6.0 / 4), **EXACT)


def test_masked_diffusion_loss_weighs_each_sample_the_same_whatever_its_subject_size():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    mask = torch.zeros(2, 2, 2)
    mask[0] = 1.0  # sample 0: everything is subject, error 1 everywhere
    mask[1, 0, 0] = 1.0  # sample 1: a single pixel, error 9
    torch.testing.assert_close(masked_diffusion_loss(prediction, target, mask), torch.tensor((1.0 + 9.0) / 2), **EXACT)


def test_v_weights_turn_the_noise_error_into_the_v_error_of_each_sample():
    # x_t = x0 + sigma * eps on the variance-preserving schedule scaled by 1 / sqrt(sigma^2 + 1): a noise
    # error e is an x0 error sigma * e and a v error e * sqrt(sigma^2 + 1)
    sigma = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(v_weights(sigma), torch.tensor([1.25, 10.0]), **EXACT)
    prediction, target, mask = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.ones(2, 2, 2)
    loss = masked_diffusion_loss(prediction, target, mask, v_weights(sigma))
    torch.testing.assert_close(loss, torch.tensor((1.25 + 10.0) / 2), **EXACT)


def test_masked_diffusion_loss_resizes_the_mask_by_area_and_ignores_samples_without_subjects():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[2.0, 0.0], [0.0, 4.0]]]]).expand(2, -1, -1, -1)
    mask = torch.zeros(2, 4, 4)
    mask[0, 0, 0] = 1.0  # a quarter of the top-left latent cell
    mask[0, 2:, 2:] = 1.0  # all of the bottom-right one
    # sample 0: (0.25 * 4 + 1.0 * 16) / 1.25; sample 1 has no subject: 0
    expected = torch.tensor((0.25 * 4 + 16.0) / 1.25 / 2)
    torch.testing.assert_close(masked_diffusion_loss(prediction, target, mask), expected, **EXACT)


def test_prior_map_averages_the_prior_weight_of_layers_on_the_largest_grid():
    fine = torch.tensor([[0.1, 0.2, 0.3, 0.4]])[..., None]  # r1 on a 2x2 grid
    coarse = torch.tensor([[0.5]])[..., None]  # r1 on a 1x1 grid: constant when upsampled
    r0 = prior_map([fine, coarse], [(2, 2), (1, 1)])
    expected = torch.tensor([[[0.9 + 0.5, 0.8 + 0.5], [0.7 + 0.5, 0.6 + 0.5]]]) / 2
    torch.testing.assert_close(r0, expected, **EXACT)


def test_router_loss_is_the_mean_over_background_of_the_squared_distance_from_the_prior():
    r1 = torch.tensor([[0.1, 0.2, 0.3, 0.4]])[..., None]  # 2x2 grid, row-major
    mask = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # the last pixel is the subject
    # background pixels have 1 - R = r1 = 0.1, 0.2, 0.3: (0.01 + 0.04 + 0.09) / 3
    torch.testing.assert_close(router_loss([r1], [(2, 2)], mask), torch.tensor(0.14 / 3), **EXACT)


def test_router_loss_over_two_layers_uses_their_mean_prior_weight():
    fine = torch.tensor([[0.1, 0.2, 0.3, 0.4]])[..., None]
    coarse = torch.tensor([[0.5]])[..., None]
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the top row is the subject
    # background: 1 - R = (0.3 + 0.5) / 2 and (0.4 + 0.5) / 2
    expected = torch.tensor((0.4**2 + 0.45**2) / 2)
    torch.testing.assert_close(router_loss([fine, coarse], [(2, 2), (1, 1)], mask), expected, **EXACT)


def test_router_loss_is_zero_when_the_background_is_all_prior_whatever_the_subject():
    r1 = torch.tensor([[0.0, 0.0, 0.0, 0.9]])[..., None]
    mask = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert router_loss([r1], [(2, 2)], mask).item() == 0.0


def test_router_loss_gradient_reaches_the_router_weights_of_background_pixels_only():
    r1 = torch.tensor([[0.1, 0.2, 0.3, 0.4]])[..., None].requires_grad_()
    mask = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    router_loss([r1], [(2, 2)], mask).backward()
    # d/dr1 of r1^2 / 3 = 2 r1 / 3 on the background, 0 on the subject
    torch.testing.assert_close(r1.grad[0, :, 0], torch.tensor([0.2, 0.4, 0.6, 0.0]) / 3, **EXACT)


def test_router_subject_loss_is_the_mean_over_subject_pixels_of_the_squared_prior_weight():
    r1 = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])[..., None]
    mask = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]).expand(2, -1, -1).clone()
    mask[1] = 0.0  # sample 1 has no subject: it adds 0
    # sample 0: subject pixels have R = 0.7, 0.6
    expected = torch.tensor((0.7**2 + 0.6**2) / 2 / 2)
    torch.testing.assert_close(router_subject_loss([r1], [(2, 2)], mask), expected, **EXACT)


def test_object_loss_is_attention_outside_minus_inside_the_subject():
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])  # one token, one head, 2x2 pixels
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # its subject is the top row
    loss = object_loss([attention], [(2, 2)], masks, torch.tensor([0]), batch=1)
    torch.testing.assert_close(loss, torch.tensor(0.35 - 0.15), **EXACT)


def test_object_loss_averages_heads_and_layers():
    heads = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])  # head values 0.2 and -0.2
    coarse = torch.tensor([[[0.7]]])  # 1x1 grid: the mask covers half the cell, inside = outside
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    loss = object_loss([heads, coarse], [(2, 2), (1, 1)], masks, torch.tensor([0]), batch=1)
    torch.testing.assert_close(loss, torch.tensor(0.0), **EXACT)
    loss = object_loss([heads[:, :1], coarse], [(2, 2), (1, 1)], masks, torch.tensor([0]), batch=1)
    torch.testing.assert_close(loss, torch.tensor((0.2 + 0.0) / 2), **EXACT)


def test_object_loss_averages_tokens_per_sample_then_samples_including_those_without_subjects():
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.3, 0.2, 0.1]], [[0.0, 0.0, 0.0, 1.0]]])
    top = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    corner = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    masks = torch.stack([top, top, corner])
    rows = torch.tensor([0, 0, 2])  # two tokens of sample 0, one of sample 2, none of sample 1
    # sample 0: (0.2 + -0.2) / 2 = 0; sample 2: 0 - 1 = -1; sample 1: 0
    loss = object_loss([attention], [(2, 2)], masks, rows, batch=3)
    torch.testing.assert_close(loss, torch.tensor(-1.0 / 3), **EXACT)


def test_object_loss_without_subject_tokens_is_zero():
    loss = object_loss([torch.zeros(0, 2, 4)], [(2, 2)], torch.zeros(0, 2, 2), torch.zeros(0, dtype=torch.long), 2)
    assert loss.item() == 0.0


def test_object_loss_gradient_lowers_attention_outside_and_raises_it_inside():
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]).requires_grad_()
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    object_loss([attention], [(2, 2)], masks, torch.tensor([0]), batch=1).backward()
    torch.testing.assert_close(attention.grad[0, 0], torch.tensor([-0.5, -0.5, 0.5, 0.5]), **EXACT)


@pytest.mark.parametrize("loss", ["masked", "router"])
def test_losses_are_batch_means_so_halves_average_to_the_whole(loss):
    """What makes two processes of half the batch train like one process of the whole batch."""
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 8, 8, generator=generator) > 0.6).float()
    if loss == "masked":
        prediction, target = torch.randn(2, 4, 4, 4, 4, generator=generator)

        def fn(rows):
            return masked_diffusion_loss(prediction[rows], target[rows], mask[rows])
    else:
        r1 = torch.rand(4, 16, 1, generator=generator)

        def fn(rows):
            return router_loss([r1[rows]], [(4, 4)], mask[rows])

    halves = (fn(slice(0, 2)) + fn(slice(2, 4))) / 2
    torch.testing.assert_close(fn(slice(0, 4)), halves, atol=1e-6, rtol=1e-6)
