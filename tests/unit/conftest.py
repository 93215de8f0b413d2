"""Helpers shared by the tier-1 tests: seeded perturbation of modules and a reference attention."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def _perturb(module: nn.Module, seed: int, std: float = 1.0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def _multi_head_attention(heads: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, inner = q.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, inner)

    return attention


@pytest.fixture
def perturb():
    """perturb(module, seed, std=1.0): every parameter replaced by seeded normal values; returns the module."""
    return _perturb


@pytest.fixture
def attention():
    """attention(heads): q [b, n, h*d], k, v [b, t, h*d] -> [b, n, h*d] via scaled_dot_product_attention."""
    return _multi_head_attention
