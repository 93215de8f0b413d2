"""What one training forward's losses need, collected by the MoA patch as the UNet runs."""

from collections.abc import Iterable

import torch

from .prompt import SubjectTokens


class TrainingProbe:
    """Filled during one forward: r1 of every MoA layer (with gradients) and, for the chosen
    cross-attention layers, the personal expert's attention to each subject token."""

    def __init__(self, attention_layers: Iterable[int] = ()) -> None:
        self.attention_layers = frozenset(attention_layers)  # MoA layer indices
        self.router: dict[int, torch.Tensor] = {}  # layer -> r1 [b, n, 1]
        self.attention: dict[int, torch.Tensor] = {}  # layer -> [k, heads, n], see prompt.subject_attention
        self.grids: dict[int, tuple[int, int]] = {}  # layer -> (h, w) of its n pixels
        self.tokens: SubjectTokens | None = None  # the k subject tokens the attention rows belong to
