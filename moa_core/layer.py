"""One MoA layer's own parameters: the personal projections' deltas and the router."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import like
from .router import Router, router_hidden_dim
from .unet_layout import LayerSpec


class Delta(nn.Module):
    """The personal projection minus the prior's: full-rank (`weight`) or low-rank (`up @ down`).

    Storing the difference lets one weights file follow the model it is applied to: the personal
    projection is the current model's own projection (fine-tune, LoRA and all) plus this delta.
    Starts at zero, so an untrained personal projection is exactly the prior's.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        if rank:
            self.down = nn.Parameter(torch.empty(rank, in_dim))
            self.up = nn.Parameter(torch.zeros(out_dim, rank))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        else:
            self.weight = nn.Parameter(torch.zeros(out_dim, in_dim))

    def is_zero(self) -> bool:
        """Whether this delta adds nothing (reads the weights back from their device)."""
        return not (self.up if self.rank else self.weight).any()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank:
            return F.linear(F.linear(x, like(self.down, x)), like(self.up, x))
        return F.linear(x, like(self.weight, x))


class MoALayer(nn.Module):
    """Deltas of the personal q/k/v/out projections and the router of one attention layer."""

    def __init__(self, spec: LayerSpec, delta_rank: int = 0, router_ratio: float = 0.25, prior_init: float = 0.9):
        super().__init__()
        self.spec = spec
        self.delta_q = Delta(spec.query_dim, spec.inner_dim, delta_rank)
        self.delta_k = Delta(spec.context_dim, spec.inner_dim, delta_rank)
        self.delta_v = Delta(spec.context_dim, spec.inner_dim, delta_rank)
        self.delta_out = Delta(spec.inner_dim, spec.query_dim, delta_rank)
        self.router = Router(spec.query_dim, router_hidden_dim(spec.query_dim, router_ratio), prior_init)

    def personal_is_prior(self) -> bool:
        """Whether every delta is zero: the personal expert then computes the prior's function."""
        return all(d.is_zero() for d in (self.delta_q, self.delta_k, self.delta_v, self.delta_out))
