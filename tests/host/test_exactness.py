"""Tier-2 invariants: where MoA must not act, the output is the base model's, bit for bit."""

import pytest
import torch

from comfyui_moa.moa_core import FuserConfig, RouterMode
from moa_testing.tiny import FAMILIES, fill_, moa_weights_for, sample

pytestmark = pytest.mark.parametrize("family", FAMILIES)


def test_strength_zero_equals_base_model(base_model, conds, apply, trained):
    assert torch.equal(sample(apply(trained, strength=0.0), *conds), sample(base_model, *conds))


def test_router_forced_to_prior_equals_base_model(base_model, conds, apply, trained):
    patched = apply(trained, router_mode=RouterMode.PRIOR)
    assert torch.equal(sample(patched, *conds), sample(base_model, *conds))


def test_window_that_excludes_every_step_equals_base_model(base_model, conds, apply, trained):
    # end at 0 % of the schedule: no step's sigma lies in the window
    patched = apply(trained, start_percent=0.0, end_percent=0.0)
    assert torch.equal(sample(patched, *conds), sample(base_model, *conds))


@pytest.mark.parametrize("router_mode", [RouterMode.LEARNED, RouterMode.PERSONAL])
@pytest.mark.parametrize("personal_rows", ["all", "cond"])
def test_moa_init_equals_base_model_whatever_the_router(base_model, conds, apply, router_mode, personal_rows):
    weights = moa_weights_for(base_model)
    for layer in weights.layers:  # a router that varies per pixel, far from the init
        fill_(layer.router, seed=11, std=1.0)
    patched = apply(weights, router_mode=router_mode, personal_rows=personal_rows)
    assert torch.equal(sample(patched, *conds), sample(base_model, *conds))


def test_moa_init_without_fuser_conditioning_equals_base_model(base_model, conds, apply):
    text_dim = conds[0][0][0].shape[-1]  # SD1.5 768, SDXL 2048
    fuser = FuserConfig(text_dim=text_dim, timestep_conditioning=False, layer_conditioning=False)
    weights = moa_weights_for(base_model, fuser=fuser)
    assert torch.equal(sample(apply(weights, router_mode=RouterMode.PERSONAL), *conds), sample(base_model, *conds))


def test_trained_weights_change_the_output_and_router_maps_vary_across_pixels(base_model, conds, apply, trained):
    patched, record = apply(trained, record=True)
    base = sample(base_model, *conds)
    out = sample(patched, *conds)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    for step in record.steps():
        for layer in record.layers():
            r1 = record.get(step, layer).float()
            assert r1.std() > 1e-4, f"router map of {record.layer_paths[layer]} is flat"
            assert 0.0 <= r1.min() and r1.max() <= 1.0
