"""The MoA forward of one attention layer: the one home of the mixture maths.

The prior expert's output is whatever the host model computed (its frozen attention, with every
LoRA and other patch in it). The personal expert runs the same attention with its own projections
(the host's projections, called, plus this layer's deltas) and, in cross-attention, a context in
which each subject word carries its subject. The router mixes them per pixel:

    out = prior + w * (personal - prior),   w = r1 * strength * region

which equals r0 * prior + r1 * personal for r0 + r1 = 1 (strength 1, no region) and gives the
prior bit for bit wherever w is zero. Where the caller knows the experts are the same function
(zero deltas and the same context, as in "MoA init") the personal expert is not run at all: the
prior is then the mixture exactly, whichever attention kernel the personal expert would use.

Cheaper modes skip work without changing what they keep:
- rows: the personal expert runs on some batch rows only (e.g. the cond rows); the others keep
  the prior exactly.
- sparse (`Mixing.threshold` > 0): it runs only at the pixels whose w passes the threshold. Their
  queries are gathered (keys and values stay those of every pixel of the row), the result is
  scattered back, and every other pixel keeps the prior exactly. A dropped pixel differs from
  the dense output by w * |personal - prior| <= threshold * |personal - prior|: at most what
  lowering the strength by `threshold` would change there. (`Mixing.gather` False: the same
  mixture with w zeroed in place, for devices where the gather costs more than it saves.)
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .helpers import like
from .layer import Delta, MoALayer

Projection = Callable[[torch.Tensor], torch.Tensor]
QKHook = Callable[[torch.Tensor, torch.Tensor], None]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [b, n, h*d], k and v [b, t, h*d] -> [b, n, h*d]; the caller binds the head count."""


class RouterMode(enum.Enum):
    LEARNED = "learned"
    PRIOR = "prior everywhere"
    PERSONAL = "personal everywhere"
    ATTENTION = "from attention"  # moa_core.attention_router: the caller passes r1 in


@dataclass(frozen=True)
class Mixing:
    """How the experts mix in every layer; resolved once when the node runs."""

    strength: float = 1.0  # scales r1
    router_mode: RouterMode = RouterMode.LEARNED
    threshold: float = 0.0  # > 0: pixels with w <= threshold keep the prior exactly
    gather: bool = True
    """How a threshold saves work: True gathers the passing queries, so the personal expert runs on
    those alone (one host sync per layer sizes the gather); False zeroes w below the threshold and
    runs it everywhere, with no sync and fewer operations: faster where launching work costs more
    than doing it (a GPU at SD1.5 sizes). Both give the same mixture."""


DENSE = Mixing()


WeightOf = Callable[[torch.Tensor], torch.Tensor | None]
"""x -> the weight [o, i] a bias-free linear projection multiplies x by, or None where building it
would cost more than calling the projection a second time."""


@dataclass(frozen=True)
class PriorProjections:
    """The host attention's projections, as callables: called so LoRA, low-VRAM casting and weight
    streaming apply to the personal expert exactly as to the prior."""

    q: Projection
    k: Projection
    v: Projection
    out: Projection
    q_weight: WeightOf | None = None
    k_weight: WeightOf | None = None
    v_weight: WeightOf | None = None
    """Where given, the personal projection is one matmul with weight + delta instead of the
    projection's call plus the delta's: it saves a pass over every row, which pays where matmuls
    dominate (the CPU)."""


def personal_attention(
    x: torch.Tensor,
    context: torch.Tensor,
    value: torch.Tensor,
    prior: PriorProjections,
    layer: MoALayer,
    attention: AttentionFn,
    on_qk: QKHook | None = None,
) -> torch.Tensor:
    """The personal expert: queries x [b, n, c], context/value [b, t, c'] -> [b, n, c].

    For self-attention context and value are every pixel of the row, whichever pixels x holds.
    `on_qk` sees the personal queries and keys (training reads the subject tokens' attention)."""
    q = project(prior.q, layer.delta_q, x, prior.q_weight)
    k = project(prior.k, layer.delta_k, context, prior.k_weight)
    if on_qk is not None:
        on_qk(q, k)
    v = project(prior.v, layer.delta_v, value, prior.v_weight)
    a = attention(q, k, v)
    return plus_delta(prior.out(a), layer.delta_out, a)


def project(proj: Projection, delta: Delta, x: torch.Tensor, weight_of: WeightOf | None = None) -> torch.Tensor:
    """proj(x) + delta(x) for x [..., i] -> [..., o]: one matmul with the merged weight where
    `weight_of` gives proj's weight for x, else proj's call and the delta's matmul. Zero deltas give
    proj(x)'s exact bits either way (the same matmul, measured)."""
    weight = None if weight_of is None else weight_of(x)
    if weight is None:
        return plus_delta(proj(x), delta, x)
    if delta.rank:
        matrix = like(delta.up, x) @ like(delta.down, x)
    else:
        matrix = like(delta.weight, x)
    # row-major [o, i] like the host's own weight, so F.linear picks the very same kernel
    return F.linear(x, (weight + matrix).contiguous())


def called_weight(proj: Projection) -> WeightOf:
    """A bias-free linear projection's weight as proj(I)^T, built by calling it (LoRA and casting
    apply, the weight is never read), where x has at least as many rows as features: one [i, i]
    call then costs no more than the [rows, i] one it saves."""

    def weight_of(x: torch.Tensor) -> torch.Tensor | None:
        features = x.shape[-1]
        if x.numel() < features * features:
            return None
        return proj(torch.eye(features, device=x.device, dtype=x.dtype)).t()

    return weight_of


def plus_delta(base: torch.Tensor, delta: Delta, x: torch.Tensor) -> torch.Tensor:
    """base [..., o] + delta(x [..., i]), the sum taken inside the delta's last matmul (addmm):
    one pass over the output instead of a matmul, then an add. A zero delta adds exact zeros."""
    flat = x.reshape(-1, x.shape[-1])
    if delta.rank:
        flat, weight = F.linear(flat, like(delta.down, x)), like(delta.up, x)
    else:
        weight = like(delta.weight, x)
    return torch.addmm(base.reshape(-1, base.shape[-1]), flat, weight.t()).view(base.shape)


def mix(prior_out: torch.Tensor, personal_out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """r0 * prior + r1 * personal, written so that w == 0 or equal experts give the prior exactly.

    (torch.lerp would fuse the three passes, but it rounds differently from this form, and the
    trainer's runs are tuned on this one; the mix is under 0.2 % of a step.)"""
    return prior_out + w * (personal_out - prior_out)


def router_weight(layer: MoALayer, x: torch.Tensor, mode: RouterMode) -> torch.Tensor:
    """r1 [b, n, 1] for hidden states x [b, n, c] under `mode`."""
    if mode is RouterMode.LEARNED:
        return layer.router.personal_weight(x)
    if mode is RouterMode.ATTENTION:
        raise ValueError("a router read from attention gives r1 to moa_attention; router_weight cannot")
    fill = 1.0 if mode is RouterMode.PERSONAL else 0.0
    return x.new_full((*x.shape[:-1], 1), fill)


def personal_share(r1: torch.Tensor, strength: float, region: torch.Tensor | None) -> torch.Tensor:
    """w [b, n, 1]: r1 [b, n, 1] times strength times the region [n, 1] (None: everywhere 1)."""
    w = r1 if strength == 1.0 else r1 * strength
    return w if region is None else w * region.to(w)


Kept = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]


def kept_pixels(w: torch.Tensor, threshold: float) -> Kept:
    """Where the personal expert must run for w [b, n, 1] and `threshold`.

    Returns (rows [b'] of w where some pixel passes, or None for all; pixels [k] where some of
    those rows passes, sorted, or None for all; w [b', n, 1] with every pixel that does not pass
    in its own row set to exactly 0). Rows share one pixel set (the union) so the gathered queries
    stay one rectangular batch. A row where nothing passes (e.g. an uncond row a trained router
    sends to the prior) is skipped. Sizing the sets reads them back from the device: the one sync
    of a sparse layer, the price of skipping the work.
    """
    keep = w > threshold
    w = torch.where(keep, w, 0.0)
    b, n = w.shape[:2]
    hits = torch.cat([keep.any(dim=1)[:, 0], keep.any(dim=0)[:, 0]]).nonzero()[:, 0]
    rows, pixels = hits[hits < b], hits[hits >= b] - b
    if rows.numel() == b:
        rows = None
    elif rows.numel():  # the pixels of the rows that run
        w, pixels = w[rows], keep[rows].any(dim=0)[:, 0].nonzero()[:, 0]
    return rows, (None if pixels.numel() == n else pixels), w


def take_rows(
    rows: torch.Tensor, x: torch.Tensor, context: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, context and value at batch rows [b'], each taken once when they are the same tensor
    (self-attention reads its keys and values from x)."""
    self_attention, shared_value = context is x, value is context
    x = x[rows]
    context = x if self_attention else context[rows]
    return x, context, (context if shared_value else value[rows])


def scatter_mix(
    prior_out: torch.Tensor,
    personal: torch.Tensor,
    w: torch.Tensor,
    rows: torch.Tensor | None,
    pixels: torch.Tensor | None,
) -> torch.Tensor:
    """prior_out [B, n, c] with mix(prior, personal, w) at rows [b] x pixels [k] (None: all).

    personal and w are [b, k, c] and [b, k, 1]; every other entry of prior_out is kept exactly."""
    if rows is None and pixels is None:
        return mix(prior_out, personal, w)
    batch, n, c = prior_out.shape
    rows = torch.arange(batch, device=prior_out.device) if rows is None else rows
    pixels = torch.arange(n, device=prior_out.device) if pixels is None else pixels
    index = (rows[:, None] * n + pixels[None, :]).reshape(-1)
    flat = prior_out.reshape(batch * n, c)
    mixed = mix(flat.index_select(0, index), personal.reshape(-1, c), w.reshape(-1, 1))
    return flat.index_copy(0, index, mixed).view(batch, n, c)


def moa_attention(
    prior_out: torch.Tensor,
    x: torch.Tensor,
    context: torch.Tensor,
    value: torch.Tensor,
    prior: PriorProjections,
    layer: MoALayer,
    attention: AttentionFn,
    mixing: Mixing = DENSE,
    rows: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    on_qk: QKHook | None = None,
    personal_is_prior: bool = False,
    r1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoA layer: the prior's output [B, n, c] -> (mixed output [B, n, c], r1 [b, n, 1]).

    x [B, n, c] is the attention's input, context/value [B, t, c'] its keys' and values' source
    (x itself in self-attention). `rows` (long [b]) restricts the personal expert to those batch
    rows (None: all); `region` [n, 1] scales w per pixel. r1 is the router's, before strength and
    region, for every pixel of the rows that ran. `personal_is_prior`: the caller knows the two
    experts compute the same function here; only the router runs. `r1` [B, n, 1]: the router's
    weights, given by the caller (a router read from attention) instead of computed here.
    """
    if rows is not None:
        x, context, value = take_rows(rows, x, context, value)
        r1 = None if r1 is None else r1[rows]
    r1 = router_weight(layer, x, mixing.router_mode) if r1 is None else r1
    if personal_is_prior:
        return prior_out, r1
    w = personal_share(r1, mixing.strength, region)
    pixels = None
    if mixing.threshold > 0.0 and not mixing.gather:
        w = torch.where(w > mixing.threshold, w, 0.0)
    elif mixing.threshold > 0.0:
        live, pixels, w = kept_pixels(w, mixing.threshold)
        if live is not None:
            if live.numel() == 0:
                return prior_out, r1
            x, context, value = take_rows(live, x, context, value)
            rows = live if rows is None else rows[live]
        if pixels is not None:
            x, w = x.index_select(1, pixels), w.index_select(1, pixels)
    personal = personal_attention(x, context, value, prior, layer, attention, on_qk)
    return scatter_mix(prior_out, personal, w, rows, pixels), r1


def image_attention_difference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, w: torch.Tensor, attention: AttentionFn
) -> torch.Tensor:
    """sum_i w_i * Attn(q, k_i, v_i) [b, n, h*d] for experts i whose difference from the prior is one
    linear map of their own attention (IP-Adapter's decoupled image attention: personal_i - prior =
    to_out's matrix @ Attn(q, k_ip_i, v_ip_i)). That map is linear, so the weighted sum is taken
    before it: one matmul after this whatever the number of experts (`mix_differences`).

    q [b, n, h*d]; keys/values [s, b, t, h*d] (expert i's tokens for each row); w [s, b, n, 1]."""
    s, b, n = w.shape[:3]
    if s == 1:
        return w[0] * attention(q, keys[0], values[0])
    queries = q.expand(s, -1, -1, -1).reshape(s * b, n, q.shape[-1])
    a = attention(queries, keys.flatten(0, 1), values.flatten(0, 1)).view(s, b, n, -1)
    return (w * a).sum(dim=0)


def mix_differences(
    prior_out: torch.Tensor,
    difference: torch.Tensor,
    rows: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """prior + sum_i w_i * (personal_i - prior), given that sum (`difference` [b, k, c]) at batch rows
    [b] x pixels [k] of prior_out [B, n, c] (None: all). Every other entry keeps the prior exactly,
    and so does every entry where all w_i are 0 (the sum is exact zeros there)."""
    if rows is None and pixels is None:
        return prior_out + difference
    batch, n, c = prior_out.shape
    rows = torch.arange(batch, device=prior_out.device) if rows is None else rows
    pixels = torch.arange(n, device=prior_out.device) if pixels is None else pixels
    index = (rows[:, None] * n + pixels[None, :]).reshape(-1)
    flat = prior_out.reshape(batch * n, c)
    return flat.index_add(0, index, difference.reshape(-1, c)).view(batch, n, c)
