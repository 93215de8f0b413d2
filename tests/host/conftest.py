"""Tier 2: the real ComfyUI host in-process, tiny models built from its own classes."""

import pytest
import torch

from comfyui_moa.moa_core import PersonalPrompt, RouterRecord
from moa_testing.tiny import family_cond, moa_weights_for, model_patcher, tiny_model


@pytest.fixture
def family() -> str:
    """The tiny models' family; a test runs on both with `pytest.mark.parametrize("family", FAMILIES)`."""
    return "sd15"


@pytest.fixture
def base_model(family):
    return tiny_model(family, seed=0)


@pytest.fixture
def conds(family):
    """(positive, negative) of 77 tokens each."""
    return family_cond(family, 1), family_cond(family, 2)


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
