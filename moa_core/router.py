"""The per-pixel router: how much of each pixel the personal expert paints."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import like


def router_hidden_dim(query_dim: int, ratio: float) -> int:
    return max(1, round(query_dim * ratio))


class Router(nn.Module):
    """Hidden state -> soft weights (prior, personal) per pixel, summing to one.

    A two-layer MLP on the attention's (already layer-normed) input. The last layer starts at zero
    with a bias giving the prior `prior_init` of every pixel, so an untrained router is a constant.
    """

    def __init__(self, dim: int, hidden: int, prior_init: float = 0.9) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.tensor([math.log(prior_init / (1.0 - prior_init)), 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, n, d] -> weights [b, n, 2]: index 0 the prior, 1 the personal expert."""
        h = F.gelu(F.linear(x, like(self.fc1.weight, x), like(self.fc1.bias, x)))
        logits = F.linear(h, like(self.fc2.weight, x), like(self.fc2.bias, x))
        return logits.float().softmax(dim=-1).to(x.dtype)

    def personal_weight(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, n, d] -> r1 [b, n, 1], the personal expert's share of each pixel."""
        return self.forward(x)[..., 1:]
