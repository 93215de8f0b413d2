"""The MoA forward of one attention layer: the one home of the mixture maths.

The prior expert's output is whatever the host model computed (its frozen attention, with every
LoRA and other patch in it). The personal expert runs the same attention with its own projections
(the host's projections, called, plus this layer's deltas) and, in cross-attention, a context in
which each subject word carries its subject. The router mixes them per pixel:

    out = prior + strength * r1 * (personal - prior)

which equals r0 * prior + r1 * personal for r0 + r1 = 1 and gives the prior bit for bit wherever
r1 * strength is zero or the two experts agree.
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layer import MoALayer

Projection = Callable[[torch.Tensor], torch.Tensor]
QKHook = Callable[[torch.Tensor, torch.Tensor], None]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [b, n, h*d], k and v [b, t, h*d] -> [b, n, h*d]; the caller binds the head count."""


class RouterMode(enum.Enum):
    LEARNED = "learned"
    PRIOR = "prior everywhere"
    PERSONAL = "personal everywhere"


@dataclass(frozen=True)
class PriorProjections:
    """The host attention's projections, as callables: called (never read) so LoRA, low-VRAM
    casting and weight streaming apply to the personal expert exactly as to the prior."""

    q: Projection
    k: Projection
    v: Projection
    out: Projection


def personal_attention(
    x: torch.Tensor,
    context: torch.Tensor,
    value: torch.Tensor,
    prior: PriorProjections,
    layer: MoALayer,
    attention: AttentionFn,
    on_qk: QKHook | None = None,
) -> torch.Tensor:
    """The personal expert: x [b, n, c], context/value [b, t, c'] -> [b, n, c].

    `on_qk` sees the personal queries and keys (training reads the subject tokens' attention)."""
    q = prior.q(x) + layer.delta_q(x)
    k = prior.k(context) + layer.delta_k(context)
    if on_qk is not None:
        on_qk(q, k)
    v = prior.v(value) + layer.delta_v(value)
    a = attention(q, k, v)
    return prior.out(a) + layer.delta_out(a)


def mix(prior_out: torch.Tensor, personal_out: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """r0 * prior + r1 * personal, written so that r1 == 0 or equal experts give the prior exactly."""
    return prior_out + r1 * (personal_out - prior_out)


def router_weight(layer: MoALayer, x: torch.Tensor, mode: RouterMode) -> torch.Tensor:
    """r1 [b, n, 1] for hidden states x [b, n, c] under `mode`."""
    if mode is RouterMode.LEARNED:
        return layer.router.personal_weight(x)
    fill = 1.0 if mode is RouterMode.PERSONAL else 0.0
    return x.new_full((*x.shape[:-1], 1), fill)


def moa_attention(
    prior_out: torch.Tensor,
    x: torch.Tensor,
    context: torch.Tensor,
    value: torch.Tensor,
    prior: PriorProjections,
    layer: MoALayer,
    attention: AttentionFn,
    rows: torch.Tensor | None = None,
    strength: float = 1.0,
    router_mode: RouterMode = RouterMode.LEARNED,
    on_qk: QKHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoA layer: the prior's output [b, n, c] -> (mixed output [b, n, c], r1 [b', n, 1]).

    `rows` (long [b']) restricts the personal expert to those batch rows (the others keep the
    prior); None runs it on all. r1 is returned for the rows that ran, before `strength`.
    """
    if rows is not None:
        x, context, value = x[rows], context[rows], value[rows]
    r1 = router_weight(layer, x, router_mode)
    personal = personal_attention(x, context, value, prior, layer, attention, on_qk)
    weight = r1 if strength == 1.0 else r1 * strength
    if rows is None:
        return mix(prior_out, personal, weight), r1
    mixed = mix(prior_out[rows], personal, weight)
    return prior_out.index_copy(0, rows, mixed), r1
