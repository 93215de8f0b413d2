"""Tier 1: the merged MoA layer (projections summed once per run) is mixture.moa_attention's mixture."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from comfyui_moa.moa_core.layer import MoALayer
from comfyui_moa.moa_core.merged import HostWeights, merge_layer, merged_moa_attention, merged_router
from comfyui_moa.moa_core.mixture import Mixing, PriorProjections, RouterMode, moa_attention
from comfyui_moa.moa_core.unet_layout import LayerSpec

B, N, T, C, CTX, INNER, HEADS = 3, 6, 4, 8, 12, 16, 2
TOL = {"rtol": 1e-5, "atol": 1e-5}


def spec(cross: bool) -> LayerSpec:
    return LayerSpec(f"input_blocks.1.1.transformer_blocks.0.attn{2 if cross else 1}", C, CTX if cross else C, INNER)


def host_layer(cross: bool, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    context = CTX if cross else C
    return {
        "q": nn.Linear(C, INNER, bias=False),
        "k": nn.Linear(context, INNER, bias=False),
        "v": nn.Linear(context, INNER, bias=False),
        "out": nn.Sequential(nn.Linear(INNER, C), nn.Dropout(0.0)),
    }


def host_weights(lin: dict[str, nn.Module]) -> HostWeights:
    out = lin["out"][0]
    return HostWeights(lin["q"].weight.t(), lin["k"].weight.t(), lin["v"].weight.t(), out.weight.t(), out.bias)


def heads_split(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def case(cross: bool, perturb, attention, rank: int = 0, seed: int = 0):
    """(prior output, x, context, merged layer, its MoALayer, the host's projections) of one layer."""
    lin = {name: m.requires_grad_(False) for name, m in host_layer(cross, seed).items()}
    layer = perturb(MoALayer(spec(cross), delta_rank=rank), seed + 1, std=0.3).requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, N, C, generator=generator)
    context = torch.randn(B, T, CTX, generator=generator) if cross else x
    prior = PriorProjections(lin["q"], lin["k"], lin["v"], lin["out"])
    prior_out = lin["out"](attention(HEADS)(lin["q"](x), lin["k"](context), lin["v"](context)))
    return prior_out, x, context, merge_layer(layer, host_weights(lin)), layer, prior


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("rank", [0, 3])
def test_the_merged_layer_gives_the_mixture_of_moa_attention(cross, rank, perturb, attention):
    prior_out, x, context, merged, layer, prior = case(cross, perturb, attention, rank)
    expected, r1 = moa_attention(prior_out, x, context, context, prior, layer, attention(HEADS))
    out, merged_r1 = merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, Mixing())
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(merged_r1, r1, **TOL)
    assert (out - prior_out).abs().max() > 0.1  # the personal expert changed it


def test_the_merged_router_is_the_routers_personal_share(perturb):
    layer = perturb(MoALayer(spec(False)), 4, std=0.5)
    x = torch.randn(B, N, C)
    lin = host_layer(False, 0)
    merged = merge_layer(layer, host_weights(lin))
    torch.testing.assert_close(merged_router(x, merged), layer.router.personal_weight(x), **TOL)


@pytest.mark.parametrize("cross", [False, True])
def test_rows_region_strength_and_threshold_mix_as_in_moa_attention(cross, perturb, attention):
    prior_out, x, context, merged, layer, prior = case(cross, perturb, attention, seed=5)
    rows = torch.tensor([0, 2])
    region = torch.linspace(0, 1, N)[:, None]
    mixing = Mixing(strength=0.7, threshold=0.2, gather=False)
    expected, r1 = moa_attention(prior_out, x, context, context, prior, layer, attention(HEADS), mixing, rows, region)
    out, merged_r1 = merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, mixing, rows, region)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(merged_r1, r1, **TOL)
    assert torch.equal(out[1], prior_out[1])  # a row the personal expert does not run on: the prior exactly
    assert torch.equal(out[:, 0], prior_out[:, 0])  # region 0 there


@pytest.mark.parametrize("cross", [False, True])
def test_the_prior_router_and_a_given_r1_of_zero_give_the_prior_bit_for_bit(cross, perturb, attention):
    prior_out, x, context, merged, _, _ = case(cross, perturb, attention, seed=7)
    out, r1 = merged_moa_attention(
        prior_out, x, context, merged, HEADS, heads_split, Mixing(router_mode=RouterMode.PRIOR)
    )
    assert torch.equal(out, prior_out) and not r1.any()
    out, _ = merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, Mixing(), r1=torch.zeros(B, N, 1))
    assert torch.equal(out, prior_out)


def test_a_personal_router_gives_the_personal_expert(perturb, attention):
    prior_out, x, context, merged, layer, prior = case(True, perturb, attention, seed=9)
    mixing = Mixing(router_mode=RouterMode.PERSONAL)
    expected, _ = moa_attention(prior_out, x, context, context, prior, layer, attention(HEADS), mixing)
    out, _ = merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, mixing)
    torch.testing.assert_close(out, expected, **TOL)


def test_batched_personal_keys_values_are_each_layers_own_from_its_personal_context(perturb, attention):
    from comfyui_moa.moa_core.merged import cross_stack, personal_keys_values
    from comfyui_moa.moa_core.prompt import SubjectTokens, personal_context

    cases = [case(True, perturb, attention, seed=seed) for seed in (11, 12, 13)]
    merged = {i: c[3] for i, c in enumerate(cases)}
    heads = {0: HEADS, 1: 2 * HEADS, 2: HEADS}  # two groups, the second between the first's layers
    stack = cross_stack(merged, {0: 0, 1: 1, 2: 2}, heads)
    assert [g.layers for g in stack.groups] == [(0, 2), (1,)] and stack.cross.tolist() == [0, 2, 1]
    context = cases[0][2]
    rows, tokens = torch.tensor([0, 2, 2]), torch.tensor([1, 0, 3])
    subject_tokens = SubjectTokens(rows, tokens, torch.zeros(3, dtype=torch.long), torch.zeros(3, 4), None, T)
    fused = torch.randn(3, 3, CTX)  # per cross-attention layer, per subject token
    batched = personal_keys_values(context, subject_tokens, fused, stack)
    for i, (prior_out, x, _, layer_merged, _, _) in enumerate(cases):
        own = personal_context(context, subject_tokens, fused, i)
        layer_heads = heads[i]
        expected, _ = merged_moa_attention(prior_out, x, own, layer_merged, layer_heads, heads_split, Mixing())
        out, _ = merged_moa_attention(
            prior_out, x, context, layer_merged, layer_heads, heads_split, Mixing(), keys_values=batched[i]
        )
        torch.testing.assert_close(out, expected, **TOL)
        assert not torch.equal(own, context)
        rows = torch.tensor([0, 2])  # the keys and values follow the rows the personal expert runs on
        expected, _ = merged_moa_attention(prior_out, x, own, layer_merged, layer_heads, heads_split, Mixing(), rows)
        out, _ = merged_moa_attention(
            prior_out, x, context, layer_merged, layer_heads, heads_split, Mixing(), rows, keys_values=batched[i]
        )
        torch.testing.assert_close(out, expected, **TOL)


class _OperationCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("cross", "most"), [(False, 13), (True, 11)])
def test_a_merged_layer_dispatches_few_operations(cross, most, perturb, attention):
    """What launching costs on a GPU (benchmarks/count_ops.py): the router (2 matmuls, gelu, sigmoid),
    the threshold, q/k/v (cross: q, with the keys and values from the group's batch) with the head
    split (one view per tensor), the kernel, the head merge (one view of the kernel's [b, n, h, d]
    memory), the output matmul and the lerp; no flattening of the [b, n, c] states. The matrices'
    batch views are built by the first call (the sampling run's)."""
    prior_out, x, context, merged, _, _ = case(cross, perturb, attention, seed=3)
    keys_values = None
    if cross:
        kv = (context @ merged.kv).view(B, T, 2, HEADS, -1).permute(2, 0, 3, 1, 4)
        keys_values = tuple(kv.unbind(0))
    mixing = Mixing(threshold=0.01, gather=False)
    merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, mixing, keys_values=keys_values)
    with _OperationCount() as count:
        merged_moa_attention(prior_out, x, context, merged, HEADS, heads_split, mixing, keys_values=keys_values)
    assert len(count.names) <= most, count.names
    assert "view" not in count.names[: count.names.index("sigmoid")]  # the router reads x as it comes


@pytest.mark.parametrize("layered", [True, False])
@pytest.mark.parametrize("timed", [True, False])
def test_the_run_s_fuser_gives_the_fusers_tokens_for_every_layer(layered, timed):
    """MergedFuser: built once per sampling run, a call is the MLP on its words and time embedding."""
    from comfyui_moa.moa_core.fuser import Fuser, FuserConfig
    from comfyui_moa.moa_core.merged import merge_fuser

    torch.manual_seed(0)
    config = FuserConfig(CTX, 10, 24, timed, layered, num_layers=5 if layered else 0, cond_dim=6)
    fuser = Fuser(config).requires_grad_(False)
    for p in fuser.parameters():
        p.normal_(0, 0.5)
    words, images = torch.randn(3, CTX), torch.randn(3, 10)
    timestep = torch.tensor([420.0])
    layers = 5 if layered else 1
    expected = fuser(
        words.expand(layers, -1, -1), images, timestep.expand(3) if timed else None, torch.arange(layers)[:, None]
    )
    merged = merge_fuser(fuser, images, words)
    time = fuser.time_embedding(timestep, words)[0] if timed else None
    torch.testing.assert_close(merged(words, time), expected, **TOL)
    assert (expected - words).abs().max() > 0.1  # the fuser changed the words
    if timed:
        with pytest.raises(ValueError, match="time embedding"):
            merged(words, None)


def test_split_and_merged_heads_are_the_views_reshapes_give():
    from comfyui_moa.moa_core.merged import merge_heads, split_heads

    y = torch.randn(2, 5, 3 * 12)
    expected = y.view(2, 5, 3, 4, 3).permute(2, 0, 3, 1, 4).unbind(0)
    for got, want in zip(split_heads(y, 4, parts=3), expected, strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()
    (q,) = split_heads(y[:, :, :12].contiguous(), 4)
    assert torch.equal(q, expected[0])
    laid_out = torch.randn(2, 5, 4, 3).transpose(1, 2)  # [b, h, n, d] in [b, n, h, d] memory
    plain = laid_out.contiguous()  # [b, h, n, d] memory: merged by a copy
    for a in (laid_out, plain):
        merged = merge_heads(a)
        assert torch.equal(merged, a.transpose(1, 2).reshape(2, 5, 12))
    assert merge_heads(laid_out).data_ptr() == laid_out.data_ptr()
