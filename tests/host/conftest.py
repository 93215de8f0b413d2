"""Tier 2: the real ComfyUI host in-process, tiny models built from its own classes."""

import pytest
import torch

from comfyui_moa.moa_core import PersonalPrompt, RouterRecord
from moa_testing.tiny import moa_weights_for, model_patcher, text_cond, tiny_sd15


@pytest.fixture
def base_model():
    return tiny_sd15(seed=0)


@pytest.fixture
def conds():
    """(positive, negative) of 77 tokens each."""
    return text_cond(1), text_cond(2)


def one_subject(prompt_length: int = 77, position: int = 5, seed: int = 3) -> PersonalPrompt:
    embeds = torch.randn(1, 768, generator=torch.Generator().manual_seed(seed))
    return PersonalPrompt.single(prompt_length, [position], [0], embeds)


@pytest.fixture
def apply(base_model):
    """apply(weights, prompt=None, record=False, model=None, weights_fixed=True, **MoAOptions fields)
    -> patched model."""
    from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa

    def _apply(weights, prompt=None, record=False, model=None, weights_fixed=True, **options):
        rec = RouterRecord(weights.paths) if record else None
        model, options = model or base_model, MoAOptions(**options)
        patched = apply_moa(
            model, model_patcher(weights), prompt or one_subject(), options, rec, weights_fixed=weights_fixed
        )
        return (patched, rec) if record else patched

    return _apply


@pytest.fixture
def trained(base_model):
    """MoA weights for the tiny model with every part random, as if trained."""
    return moa_weights_for(base_model, seed=7)
