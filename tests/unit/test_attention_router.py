"""The attention router's maths: probabilities from the subject columns and a normaliser, maps
accumulated per run, pixels split between subjects."""

import pytest
import torch
from einops import rearrange

from comfyui_moa.moa_core.attention_router import (
    AttentionRouterConfig,
    RouterRun,
    smoothed,
    subject_masks,
    subject_probabilities,
    union,
)
from comfyui_moa.moa_core.errors import OptionsError


def test_subject_probabilities_are_the_full_softmax_at_the_subject_columns_summed_and_head_averaged():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    columns = [torch.tensor([5]), torch.tensor([8, 9, 82 - 77])]
    out = subject_probabilities(q, k, heads=4, columns=columns)
    qh, kh = (rearrange(t, "b n (h d) -> b h n d", h=4) for t in (q, k))
    full = (qh @ kh.transpose(-1, -2) / 2.0).softmax(dim=-1)  # d = 4
    for s, cols in enumerate(columns):
        torch.testing.assert_close(out[:, s], full[..., cols].sum(-1).mean(1), rtol=1e-5, atol=1e-6)


def test_masks_give_each_pixel_to_one_subject_at_most_at_every_grid():
    g = torch.Generator().manual_seed(1)
    maps = smoothed(torch.rand(2, 3, 16, 16, generator=g), sigma=1.0)
    assert torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(2, 3))
    config = AttentionRouterConfig(threshold=0.1, softness=0.3)
    for hw in ((16, 16), (32, 32), (8, 8), (13, 7)):
        masks = subject_masks(maps, hw, config)
        assert masks.shape == (2, 3, hw[0] * hw[1])
        assert int(((masks > 0).sum(dim=1) > 1).sum()) == 0
        assert 0.0 <= float(masks.min()) and float(masks.max()) <= 1.0 and float(masks.max()) == 1.0
        assert torch.equal(union(masks), masks.sum(dim=1))


def test_one_subject_keeps_its_soft_map_and_a_low_map_gives_zero():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1:3, 1:3] = 1.0
    maps[0, 0, 0, 0] = 0.2
    masks = subject_masks(maps, (4, 4), AttentionRouterConfig(threshold=0.3, softness=0.2))
    assert masks.view(4, 4)[1:3, 1:3].eq(1).all() and masks.view(4, 4)[0, 0] == 0


def test_a_run_sums_the_completed_steps_and_the_current_calls_layers_and_a_new_run_starts_empty():
    run = RouterRun()
    run.begin_call(10.0)
    assert run.accumulated() is None
    one = torch.ones(1, 2, 4, 4)
    run.add(one)
    run.add(one)
    assert torch.equal(run.accumulated(), 2 * one)
    run.begin_call(10.0)  # the uncond call of the same step
    assert torch.equal(run.accumulated(), 2 * one)
    run.begin_call(5.0)
    run.add(3 * one)
    assert torch.equal(run.done, 2 * one) and torch.equal(run.accumulated(), 5 * one)
    assert RouterRun().accumulated() is None


@pytest.mark.parametrize("options", [{"warmup": 1.0}, {"threshold": -0.1}, {"softness": 0.0}, {"downscale": 0}])
def test_router_options_out_of_range_are_refused(options):
    with pytest.raises(OptionsError):
        AttentionRouterConfig(**options)
