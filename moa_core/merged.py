"""The MoA layer with its personal projections merged once per sampling run: the form for devices
where launching operations costs more than the maths (a GPU at SD1.5 sizes).

`mixture.moa_attention` calls the host's projections and adds each delta: per projection two
matmuls and their reshapes, in every model call. Here the host's weights (as the host computes
them: LoRA, casting and streaming included, read by calling its modules once) and the deltas are
summed once per sampling run into single matrices, so a layer is: the router (two matmuls, one
sigmoid: a two-way softmax is the sigmoid of the logits' difference), q, k and v of
self-attention in one matmul (q alone in cross-attention), the host's attention kernel on
head-split views, the output projection in one matmul and the mix in one lerp. Every matmul is
batched over the hidden states' rows with its matrix expanded (a view, `MergedLayer.batched`),
so the [b, n, c] states need no flattening and the results no unflattening. The personal keys
and values of every cross-attention layer of one shape come from one batched matmul per model
call (`CrossStack`): their contexts differ only in the fused subject tokens, which the run's fuser
(`MergedFuser`) makes in one MLP call for every layer. The mixture is
`mixture.moa_attention`'s (r0 * prior + r1 * personal, the prior exactly where w is 0), to float
rounding: the weights are summed before the matmul rather than after.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .fuser import Fuser
from .helpers import like
from .layer import Delta, MoALayer
from .mixture import Mixing, RouterMode, personal_share
from .prompt import SubjectTokens

HeadAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""q [b, h, n, d], k and v [b, h, t, d] (head-split views) -> [b, h, n, d]: the host's kernel."""


@dataclass(frozen=True)
class HostWeights:
    """One host attention layer's projections as x @ W matrices ([in, out], transposed from nn.Linear)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor | None


@dataclass(frozen=True)
class MergedLayer:
    """One MoA layer for a sampling run: its personal projections and router as single matrices."""

    q: torch.Tensor  # [c, i]; self-attention: [c, 3i], q | k | v
    kv: torch.Tensor | None  # cross-attention: [d, 2i], k | v; None for self-attention
    out: torch.Tensor  # [i, c]
    out_bias: torch.Tensor | None  # [c]
    router_in: torch.Tensor  # [c, hidden]
    router_in_bias: torch.Tensor  # [hidden]
    router_out: torch.Tensor  # [hidden, 1]: the personal logit's row minus the prior's
    router_out_bias: torch.Tensor  # [1]
    by_batch: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def batched(self, rows: int) -> "BatchedMatrices":
        """The matrices expanded over `rows` batch rows: stride-0 views, built once per batch size."""
        hit = self.by_batch.get(rows)
        if hit is None:
            kv = None if self.kv is None else self.kv.expand(rows, -1, -1)
            hit = self.by_batch[rows] = BatchedMatrices(
                *(m.expand(rows, -1, -1) for m in (self.q, self.out, self.router_in, self.router_out)), kv
            )
        return hit


@dataclass(frozen=True)
class BatchedMatrices:
    """A MergedLayer's matrices as [b, in, out] views, for torch.bmm / torch.baddbmm."""

    q: torch.Tensor
    out: torch.Tensor
    router_in: torch.Tensor
    router_out: torch.Tensor
    kv: torch.Tensor | None


def merge_layer(layer: MoALayer, host: HostWeights) -> MergedLayer:
    """`layer`'s personal projections (host + delta) and router as MergedLayer, in host's dtype."""
    ref = host.q

    def personal(weight: torch.Tensor, delta: Delta) -> torch.Tensor:
        matrix = like(delta.up, ref) @ like(delta.down, ref) if delta.rank else like(delta.weight, ref)
        return weight + matrix.t()

    q, k, v = (personal(w, d) for w, d in ((host.q, layer.delta_q), (host.k, layer.delta_k), (host.v, layer.delta_v)))
    fc1, fc2 = layer.router.fc1, layer.router.fc2
    cross = layer.spec.is_cross
    return MergedLayer(
        q=q.contiguous() if cross else torch.cat([q, k, v], dim=1),
        kv=torch.cat([k, v], dim=1) if cross else None,
        out=personal(host.out, layer.delta_out).contiguous(),
        out_bias=host.out_bias,
        router_in=like(fc1.weight, ref).t().contiguous(),
        router_in_bias=like(fc1.bias, ref),
        router_out=like(fc2.weight[1] - fc2.weight[0], ref)[:, None].contiguous(),
        router_out_bias=like(fc2.bias[1:] - fc2.bias[:1], ref),
    )


@dataclass(frozen=True)
class CrossGroup:
    """Cross-attention layers of one shape (context width, inner width, heads) of a sampling run."""

    layers: tuple[int, ...]  # MoA layer indices
    start: int  # the group's first slot among the run's stacked personal contexts (CrossStack)
    kv: torch.Tensor  # [L, d, 2i]: each layer's MergedLayer.kv
    heads: int


@dataclass(frozen=True)
class CrossStack:
    """A sampling run's merged cross-attention layers, grouped by shape: their personal contexts
    are stacked group after group, so each group's are one slice of the stack."""

    groups: tuple[CrossGroup, ...]
    cross: torch.Tensor  # long [M]: each slot's cross-attention index (the fused tokens' layer axis)
    slots: torch.Tensor  # long [M, 1]: 0..M-1


def cross_stack(merged: dict[int, MergedLayer], cross_index: dict[int, int], heads: dict[int, int]) -> CrossStack:
    """The cross-attention layers among `merged`, grouped by shape (`heads`: each layer's head count)."""
    shapes: dict[tuple, list[int]] = {}
    for i in sorted(merged):
        if merged[i].kv is not None:
            shapes.setdefault((*merged[i].kv.shape, heads[i]), []).append(i)
    groups, order = [], []
    for shape, layers in shapes.items():
        groups.append(CrossGroup(tuple(layers), len(order), torch.stack([merged[i].kv for i in layers]), shape[-1]))
        order += [cross_index[i] for i in layers]
    device = groups[0].kv.device if groups else None
    return CrossStack(
        tuple(groups), torch.tensor(order, device=device), torch.arange(len(order), device=device)[:, None]
    )


KeysValues = tuple[torch.Tensor, torch.Tensor]
"""A cross-attention layer's personal keys and values, each [b, h, t, d]."""


def personal_keys_values(
    context: torch.Tensor, tokens: SubjectTokens, fused: torch.Tensor, stack: CrossStack
) -> dict[int, KeysValues]:
    """Each layer's personal keys and values for context [b, t, c], its subject tokens replaced by
    their fused tokens `fused` ([layers or 1, k, c]): the layers' personal contexts in one stack,
    one matmul per group."""
    b, t, c = context.shape
    count = len(stack.cross)
    contexts = context.expand(count, b, t, c)
    if tokens.rows.numel():
        values = fused if fused.shape[0] == 1 else fused[stack.cross]
        contexts = contexts.index_put((stack.slots, tokens.rows, tokens.tokens), values)
    contexts = contexts.reshape(count, b * t, c)
    by_layer = {}
    for group in stack.groups:
        n = len(group.layers)
        kv = torch.bmm(contexts[group.start : group.start + n], group.kv)
        keys, values = kv.view(n, b, t, 2, group.heads, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)
        by_layer.update(zip(group.layers, zip(keys.unbind(0), values.unbind(0), strict=True), strict=True))
    return by_layer


@dataclass(frozen=True)
class MergedFuser:
    """The fuser for one sampling run's subject tokens: what no model call changes (the subjects'
    image embeddings and the layer embeddings laid out per layer and token, the MLP's matrices as
    batched [in, out] views) built once, so that a call is the MLP on its word tokens and its
    timestep's embedding (`Fuser.time_embedding`, which a run can compute for its whole schedule at
    once). `Fuser.forward`'s result to float rounding."""

    images: torch.Tensor  # [L, k, e]
    layers: torch.Tensor | None  # [L, k, cond]: each row's layer embedding; None without layer conditioning
    timed: bool  # the fuser is timestep-conditioned
    norm: tuple[torch.Tensor, torch.Tensor]
    mlp: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (bias, [L, in, out]) for fc1, fc2, fc3

    def __call__(self, words: torch.Tensor, time: torch.Tensor | None) -> torch.Tensor:
        """words [k, d] and the call's time embedding [cond] -> fused tokens [L, k, d]."""
        if self.timed and time is None:
            raise ValueError("this fuser is timestep-conditioned: pass the time embedding")
        count, k = self.images.shape[:2]
        parts = [words.expand(count, k, -1), self.images]
        if self.timed:
            parts.append(time.expand(count, k, -1))
        if self.layers is not None:
            parts.append(self.layers)
        h = torch.cat(parts, dim=-1)
        h = F.layer_norm(h, h.shape[-1:], *self.norm)
        (b1, w1), (b2, w2), (b3, w3) = self.mlp
        h = F.gelu(torch.baddbmm(b2, F.gelu(torch.baddbmm(b1, h, w1)), w2))
        return torch.baddbmm(b3, h, w3) + words


def merge_fuser(fuser: Fuser, images: torch.Tensor, ref: torch.Tensor) -> MergedFuser:
    """`fuser` for subject tokens whose image embeddings are images [k, e], in ref's dtype and device."""
    config = fuser.config
    count = config.num_layers if config.layer_conditioning else 1
    k = images.shape[0]
    layers = None
    if config.layer_conditioning:
        layers = like(fuser.layer_embedding.weight, ref)[:, None].expand(-1, k, -1)

    def batched(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return like(linear.bias, ref), like(linear.weight, ref).t().contiguous().expand(count, -1, -1)

    return MergedFuser(
        images=like(images, ref).expand(count, -1, -1),
        layers=layers,
        timed=config.timestep_conditioning,
        norm=(like(fuser.norm.weight, ref), like(fuser.norm.bias, ref)),
        mlp=(batched(fuser.fc1), batched(fuser.fc2), batched(fuser.fc3)),
    )


def split_heads(y: torch.Tensor, heads: int, parts: int = 1) -> tuple[torch.Tensor, ...]:
    """y [b, n, parts * h * d] (contiguous: a matmul's output) as `parts` head-split views [b, h, n, d]
    (q, or q, k and v), each one operation: what a view, a permute and an unbind make in three."""
    b, n, width = y.shape
    inner = width // parts
    size, stride = (b, heads, n, inner // heads), (n * width, inner // heads, width, 1)
    return tuple(y.as_strided(size, stride, y.storage_offset() + j * inner) for j in range(parts))


def merge_heads(a: torch.Tensor) -> torch.Tensor:
    """a [b, h, n, d] as [b, n, h * d]: one operation (a view) where a's memory is laid out [b, n, h, d],
    as fused attention kernels give it; otherwise a copy."""
    b, h, n, d = a.shape
    if a.stride() == (n * h * d, d, h * d, 1):
        return a.as_strided((b, n, h * d), (n * h * d, h * d, 1), a.storage_offset())
    return a.transpose(1, 2).reshape(b, n, h * d)


def merged_router(x: torch.Tensor, merged: MergedLayer) -> torch.Tensor:
    """r1 [b, n, 1] for hidden states x [b, n, c]: the learned router's personal share."""
    batched = merged.batched(x.shape[0])
    hidden = F.gelu(torch.baddbmm(merged.router_in_bias, x, batched.router_in))
    return torch.sigmoid(torch.baddbmm(merged.router_out_bias, hidden, batched.router_out))


def merged_moa_attention(
    prior_out: torch.Tensor,
    x: torch.Tensor,
    context: torch.Tensor,
    merged: MergedLayer,
    heads: int,
    attention: HeadAttention,
    mixing: Mixing,
    rows: torch.Tensor | None = None,
    region: torch.Tensor | None = None,
    r1: torch.Tensor | None = None,
    keys_values: KeysValues | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mixture.moa_attention` with merged projections, for self-attention (context is x) or
    cross-attention (values from the context, or `keys_values` from personal_keys_values);
    threshold as Mixing.gather False (w zeroed in place). Returns (mixed [B, n, c], r1 [b, n, 1])."""
    cross = merged.kv is not None
    if rows is not None:
        x = x[rows]
        if keys_values is not None:
            keys_values = (keys_values[0][rows], keys_values[1][rows])
        elif cross:
            context = context[rows]
        r1 = None if r1 is None else r1[rows]
    b, n, _ = x.shape
    batched = merged.batched(b)
    if r1 is None:
        if mixing.router_mode is RouterMode.LEARNED:
            r1 = merged_router(x, merged)
        else:
            r1 = x.new_full((b, n, 1), 1.0 if mixing.router_mode is RouterMode.PERSONAL else 0.0)
    w = personal_share(r1, mixing.strength, region)
    if mixing.threshold > 0.0:
        w = F.threshold(w, mixing.threshold, 0.0)
    if cross:
        (q,) = split_heads(torch.bmm(x, batched.q), heads)
        if keys_values is None:
            t = context.shape[1]
            kv = torch.bmm(context, batched.kv).view(b, t, 2, heads, -1).permute(2, 0, 3, 1, 4)
            keys_values = kv.unbind(0)
        k, v = keys_values
    else:
        q, k, v = split_heads(torch.bmm(x, batched.q), heads, parts=3)
    a = merge_heads(attention(q, k, v))
    out = torch.bmm(a, batched.out) if merged.out_bias is None else torch.baddbmm(merged.out_bias, a, batched.out)
    if rows is None:
        return torch.lerp(prior_out, out, w), r1
    return prior_out.index_copy(0, rows, torch.lerp(prior_out[rows], out, w)), r1
