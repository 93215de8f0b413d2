import pytest
import torch
from torch import nn

from comfyui_moa.moa_core.layer import Delta, MoALayer
from comfyui_moa.moa_core.mixture import (
    DENSE,
    Mixing,
    PriorProjections,
    RouterMode,
    called_weight,
    mix,
    moa_attention,
    personal_attention,
    plus_delta,
    project,
)
from comfyui_moa.moa_core.unet_layout import LayerSpec

B, N, T, C, CTX, INNER, HEADS = 3, 5, 4, 8, 12, 8, 2
SPEC = LayerSpec("input_blocks.1.1.transformer_blocks.0.attn2", C, CTX, INNER)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def linears(seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    modules = {
        "q": nn.Linear(C, INNER),
        "k": nn.Linear(CTX, INNER),
        "v": nn.Linear(CTX, INNER),
        "out": nn.Linear(INNER, C),
    }
    return {name: m.requires_grad_(False) for name, m in modules.items()}


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, C, generator=generator), torch.randn(B, T, CTX, generator=generator)


def prior_of(lin: dict[str, nn.Linear]) -> PriorProjections:
    return PriorProjections(q=lin["q"], k=lin["k"], v=lin["v"], out=lin["out"])


def host_attention(lin, attention, x, context):
    """What the host model computes: the prior expert's output."""
    return lin["out"](attention(lin["q"](x), lin["k"](context), lin["v"](context)))


def trained_layer(perturb, rank: int = 0, seed: int = 1) -> MoALayer:
    return perturb(MoALayer(SPEC, delta_rank=rank), seed, std=0.3).requires_grad_(False)


def delta_matrix(delta: Delta) -> torch.Tensor:
    return delta.up @ delta.down if delta.rank else delta.weight


def test_mix_with_zero_router_weight_gives_prior_bit_for_bit():
    prior, personal = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    assert torch.equal(mix(prior, personal, torch.zeros(2, 5, 1)), prior)


def test_mix_of_equal_experts_gives_prior_bit_for_bit_for_any_weight():
    prior = torch.randn(2, 5, 4)
    assert torch.equal(mix(prior, prior.clone(), torch.rand(2, 5, 1)), prior)


def test_mix_is_the_convex_combination_of_the_experts():
    prior, personal, r1 = torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.rand(2, 5, 1)
    torch.testing.assert_close(mix(prior, personal, r1), (1 - r1) * prior + r1 * personal, **TOL)


def test_personal_attention_with_zero_deltas_equals_the_prior_bit_for_bit(attention):
    lin, (x, context) = linears(), data()
    layer = MoALayer(SPEC)
    out = personal_attention(x, context, context, prior_of(lin), layer, attention(HEADS))
    assert torch.equal(out, host_attention(lin, attention(HEADS), x, context))


@pytest.mark.parametrize("rank", [0, 2])
def test_personal_attention_uses_prior_weights_plus_deltas(attention, perturb, rank):
    lin, (x, context) = linears(), data()
    layer = trained_layer(perturb, rank)
    merged = {}
    for name, delta in (("q", layer.delta_q), ("k", layer.delta_k), ("v", layer.delta_v), ("out", layer.delta_out)):
        weight, bias = lin[name].weight + delta_matrix(delta), lin[name].bias
        merged[name] = lambda t, weight=weight, bias=bias: t @ weight.T + bias
    expected = host_attention(merged, attention(HEADS), x, context)
    out = personal_attention(x, context, context, prior_of(lin), layer, attention(HEADS))
    torch.testing.assert_close(out, expected, **TOL)
    assert not torch.allclose(out, host_attention(lin, attention(HEADS), x, context), atol=1e-3)


def test_moa_attention_mixes_prior_and_personal_with_the_learned_router(attention, perturb):
    lin, (x, context) = linears(), data()
    layer = trained_layer(perturb)
    prior_out = host_attention(lin, attention(HEADS), x, context)
    personal = personal_attention(x, context, context, prior_of(lin), layer, attention(HEADS))
    out, r1 = moa_attention(prior_out, x, context, context, prior_of(lin), layer, attention(HEADS))
    assert torch.equal(r1, layer.router.personal_weight(x))
    assert r1.std() > 1e-3  # the check below would hide a wrong broadcast with a constant router
    torch.testing.assert_close(out, (1 - r1) * prior_out + r1 * personal, **TOL)


def test_moa_attention_on_some_rows_leaves_the_others_bit_identical(attention, perturb):
    lin, (x, context) = linears(), data()
    layer = trained_layer(perturb)
    prior_out = host_attention(lin, attention(HEADS), x, context)
    full, full_r1 = moa_attention(prior_out, x, context, context, prior_of(lin), layer, attention(HEADS))
    rows = torch.tensor([2, 0])
    out, r1 = moa_attention(prior_out, x, context, context, prior_of(lin), layer, attention(HEADS), rows=rows)
    assert torch.equal(out[1], prior_out[1])
    assert r1.shape == (2, N, 1)
    torch.testing.assert_close(r1, full_r1[rows], **TOL)
    torch.testing.assert_close(out[rows], full[rows], **TOL)
    assert not torch.allclose(out[rows], prior_out[rows], atol=1e-3)


def test_strength_zero_gives_prior_bit_for_bit(attention, perturb):
    lin, (x, context) = linears(), data()
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), trained_layer(perturb), attention(HEADS))
    out, r1 = moa_attention(prior_out, *args, Mixing(strength=0.0))
    assert torch.equal(out, prior_out)
    assert (r1 > 0).all()  # r1 is reported before strength


def test_strength_scales_the_personal_share(attention, perturb):
    lin, (x, context) = linears(), data()
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), trained_layer(perturb), attention(HEADS))
    full, _ = moa_attention(prior_out, *args)
    half, _ = moa_attention(prior_out, *args, Mixing(strength=0.5))
    torch.testing.assert_close(half - prior_out, 0.5 * (full - prior_out), **TOL)


def test_router_mode_prior_gives_prior_bit_for_bit(attention, perturb):
    lin, (x, context) = linears(), data()
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), trained_layer(perturb), attention(HEADS))
    out, r1 = moa_attention(prior_out, *args, Mixing(router_mode=RouterMode.PRIOR))
    assert torch.equal(out, prior_out)
    assert torch.equal(r1, torch.zeros(B, N, 1))


def test_router_mode_personal_gives_the_personal_expert(attention, perturb):
    lin, (x, context) = linears(), data()
    layer = trained_layer(perturb)
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), layer, attention(HEADS))
    out, r1 = moa_attention(prior_out, *args, Mixing(router_mode=RouterMode.PERSONAL))
    assert torch.equal(r1, torch.ones(B, N, 1))
    torch.testing.assert_close(out, personal_attention(*args), **TOL)


@pytest.mark.parametrize("mode", list(RouterMode))
def test_untrained_layer_gives_prior_bit_for_bit_whatever_the_router(attention, perturb, mode):
    lin, (x, context) = linears(), data()
    layer = MoALayer(SPEC)
    perturb(layer.router, seed=3)  # a router far from its init; the deltas stay zero
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), layer, attention(HEADS))
    # a router read from attention gives its r1 from outside
    r1 = torch.rand(x.shape[0], x.shape[1], 1) if mode is RouterMode.ATTENTION else None
    out, _ = moa_attention(prior_out, *args, Mixing(router_mode=mode), r1=r1)
    assert torch.equal(out, prior_out)


# Sparse routing and rows: checked against the dense computation.

SELF_SPEC = LayerSpec("input_blocks.1.1.transformer_blocks.0.attn1", C, C, INNER)
N_BIG = 40  # enough pixels for some to pass a threshold and some not


def self_linears(seed: int = 0) -> dict[str, nn.Linear]:
    torch.manual_seed(seed)
    modules = {"q": nn.Linear(C, INNER), "k": nn.Linear(C, INNER), "v": nn.Linear(C, INNER), "out": nn.Linear(INNER, C)}
    return {name: m.requires_grad_(False) for name, m in modules.items()}


def layer_case(perturb, attention, cross: bool, seed: int = 0):
    """(prior_out, args for moa_attention after prior_out) of a cross- or self-attention layer
    whose router spreads r1 over (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N_BIG, C, generator=generator)
    if cross:
        lin, spec, context = linears(), SPEC, torch.randn(B, T, CTX, generator=generator)
    else:
        lin, spec, context = self_linears(), SELF_SPEC, x
    layer = perturb(MoALayer(spec), seed + 1, std=0.3).requires_grad_(False)
    prior_out = host_attention(lin, attention(HEADS), x, context)
    return prior_out, (x, context, context, prior_of(lin), layer, attention(HEADS))


def dense_and_personal(prior_out, args):
    dense, r1 = moa_attention(prior_out, *args)
    return dense, r1, personal_attention(*args)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("cross", [True, False])
def test_sparse_keeps_dense_values_where_w_passes_and_the_prior_exactly_elsewhere(attention, perturb, cross, gather):
    prior_out, args = layer_case(perturb, attention, cross)
    dense, r1, _ = dense_and_personal(prior_out, args)
    threshold = float(r1.median())
    sparse, sparse_r1 = moa_attention(prior_out, *args, Mixing(threshold=threshold, gather=gather))
    kept = (r1 > threshold).expand_as(prior_out)
    assert 0 < kept.float().mean() < 1
    assert torch.equal(sparse_r1, r1)  # r1 is reported for every pixel
    torch.testing.assert_close(sparse[kept], dense[kept], **TOL)  # self-attention keys: every pixel
    assert torch.equal(sparse[~kept], prior_out[~kept])


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("cross", [True, False])
def test_sparse_moves_a_dropped_pixel_at_most_threshold_times_the_expert_difference(attention, perturb, cross, gather):
    prior_out, args = layer_case(perturb, attention, cross, seed=5)
    dense, r1, personal = dense_and_personal(prior_out, args)
    threshold = float(r1.quantile(0.3))
    sparse, _ = moa_attention(prior_out, *args, Mixing(threshold=threshold, gather=gather))
    bound = threshold * (personal - prior_out).abs()
    assert ((sparse - dense).abs() <= bound + 1e-6).all()


def test_threshold_zero_is_the_dense_mixture_exactly(attention, perturb):
    prior_out, args = layer_case(perturb, attention, cross=True)
    assert torch.equal(moa_attention(prior_out, *args, Mixing(threshold=0.0))[0], moa_attention(prior_out, *args)[0])


def test_threshold_below_every_weight_is_the_dense_mixture_exactly(attention, perturb):
    prior_out, args = layer_case(perturb, attention, cross=False)
    dense, r1, _ = dense_and_personal(prior_out, args)
    sparse, _ = moa_attention(prior_out, *args, Mixing(threshold=float(r1.min()) / 2))
    assert torch.equal(sparse, dense)


def counting(attn):
    """(attn, recording the query shape of each call; the list of those shapes)."""
    calls = []

    def counted(q, k, v):
        calls.append(q.shape)
        return attn(q, k, v)

    return counted, calls


def test_nothing_passing_the_threshold_returns_the_prior_without_running_the_expert(attention, perturb):
    prior_out, (x, context, value, prior, layer, attn) = layer_case(perturb, attention, cross=True)
    counted, calls = counting(attn)
    out, r1 = moa_attention(prior_out, x, context, value, prior, layer, counted, Mixing(threshold=0.999))
    assert out is prior_out and calls == []
    assert r1.shape == (B, N_BIG, 1)


@pytest.mark.parametrize("kept", [18, 3])
def test_sparse_runs_the_expert_on_the_kept_queries_only(attention, perturb, kept):
    """Queries at the kept pixels, keys over every pixel."""
    prior_out, (x, context, value, prior, layer, attn) = layer_case(perturb, attention, cross=False)
    region = torch.zeros(N_BIG, 1)
    region[2 : 2 + kept] = 1.0
    calls = []

    def counted(q, k, v):
        calls.append((q.shape[1], k.shape[1]))
        return attn(q, k, v)

    args = (x, context, value, prior, layer)
    out, _ = moa_attention(prior_out, *args, counted, Mixing(threshold=1e-6), region=region)
    assert calls == [(kept, N_BIG)]
    dense, _ = moa_attention(prior_out, *args, attn, region=region)
    torch.testing.assert_close(out, dense, **TOL)
    assert torch.equal(out[:, region[:, 0] == 0], prior_out[:, region[:, 0] == 0])


def test_sparse_without_gather_runs_the_expert_on_every_query_and_mixes_alike(attention, perturb):
    """The in-place variant (Mixing.gather False, what a GPU runs): no gather, the same mixture."""
    prior_out, (x, context, value, prior, layer, attn) = layer_case(perturb, attention, cross=False)
    region = torch.zeros(N_BIG, 1)
    region[2:20] = 1.0
    counted, calls = counting(attn)
    args = (x, context, value, prior, layer, counted)
    in_place, _ = moa_attention(prior_out, *args, Mixing(threshold=1e-6, gather=False), region=region)
    gathered, _ = moa_attention(prior_out, *args, Mixing(threshold=1e-6), region=region)
    assert [q[1] for q in calls] == [N_BIG, 18]
    torch.testing.assert_close(in_place, gathered, **TOL)
    assert torch.equal(in_place[:, region[:, 0] == 0], prior_out[:, region[:, 0] == 0])


@pytest.mark.parametrize("gather", [True, False])
def test_pixels_kept_in_one_row_only_keep_the_prior_in_the_others(attention, perturb, gather):
    prior_out, args = layer_case(perturb, attention, cross=True)
    _, r1 = moa_attention(prior_out, *args)
    threshold = float(r1.median())
    sparse, _ = moa_attention(prior_out, *args, Mixing(threshold=threshold, gather=gather))
    mixed_rows = (r1 > threshold)[..., 0]
    union = mixed_rows.any(dim=0, keepdim=True).expand_as(mixed_rows)
    only_elsewhere = union & ~mixed_rows
    assert only_elsewhere.any()  # the case this test is about
    assert torch.equal(sparse[only_elsewhere], prior_out[only_elsewhere])


def test_region_scales_the_personal_share_and_zero_keeps_the_prior_exactly(attention, perturb):
    prior_out, args = layer_case(perturb, attention, cross=True)
    dense, _ = moa_attention(prior_out, *args)
    region = torch.linspace(0.0, 1.0, N_BIG)[:, None]
    scaled, _ = moa_attention(prior_out, *args, region=region)
    torch.testing.assert_close(scaled - prior_out, region * (dense - prior_out), **TOL)
    for mixing in (DENSE, Mixing(threshold=0.05)):
        zero, _ = moa_attention(prior_out, *args, mixing, region=torch.zeros(N_BIG, 1))
        assert torch.equal(zero, prior_out)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_sparse_on_some_rows_leaves_the_others_bit_identical(attention, perturb, threshold):
    prior_out, args = layer_case(perturb, attention, cross=False)
    full, _ = moa_attention(prior_out, *args, Mixing(threshold=threshold))
    rows = torch.tensor([2, 0])
    out, r1 = moa_attention(prior_out, *args, Mixing(threshold=threshold), rows)
    assert torch.equal(out[1], prior_out[1])
    assert r1.shape == (2, N_BIG, 1)
    torch.testing.assert_close(out[rows], full[rows], **TOL)


def test_plus_delta_adds_the_delta_of_any_rank_exactly_zero_for_zero(perturb):
    x, base = torch.randn(3, 5, C), torch.randn(3, 5, INNER)
    for rank in (0, 2):
        layer = trained_layer(perturb, rank)
        torch.testing.assert_close(plus_delta(base, layer.delta_q, x), base + layer.delta_q(x), **TOL)
    assert torch.equal(plus_delta(base, MoALayer(SPEC).delta_q, x), base)


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("how", ["called", "read"])
def test_project_with_a_merged_weight_equals_the_two_matmuls(perturb, rank, how):
    torch.manual_seed(0)
    proj = nn.Linear(C, INNER, bias=False).requires_grad_(False)
    weight_of = called_weight(proj) if how == "called" else lambda x: proj.weight
    x = torch.randn(2, 20, C)  # 40 rows >= 8 features: the merged path
    layer = trained_layer(perturb, rank)
    torch.testing.assert_close(project(proj, layer.delta_q, x, weight_of), proj(x) + layer.delta_q(x), **TOL)
    zero = MoALayer(SPEC, delta_rank=rank).delta_q
    assert torch.equal(project(proj, zero, x, weight_of), proj(x))  # exactly the host's matmul


def test_project_calls_the_host_once_on_the_identity_when_merging():
    seen = []
    proj = nn.Linear(C, INNER, bias=False).requires_grad_(False)

    def called(t):
        seen.append(tuple(t.shape))
        return proj(t)

    delta = MoALayer(SPEC).delta_q
    project(called, delta, torch.randn(2, 20, C), called_weight(called))
    project(called, delta, torch.randn(1, 3, C), called_weight(called))  # fewer rows than features: two matmuls
    project(called, delta, torch.randn(2, 20, C))
    assert seen == [(C, C), (1, 3, C), (2, 20, C)]


@pytest.mark.parametrize("rows", [None, torch.tensor([2, 0])])
def test_a_row_where_nothing_passes_is_skipped_and_keeps_the_prior_exactly(attention, perturb, rows):
    prior_out, (x, context, value, prior, layer, attn) = layer_case(perturb, attention, cross=False)
    batches = []

    def counted(q, k, v):
        batches.append(q.shape[0])
        return attn(q, k, v)

    r1 = layer.router.personal_weight(x if rows is None else x[rows])[..., 0]
    dead = int(r1.amax(dim=1).argmin())
    threshold = float(r1[dead].max())  # nothing passes in that row, something in the others
    assert bool((r1 > threshold).any())
    args = (x, context, value, prior, layer)
    out, _ = moa_attention(prior_out, *args, counted, Mixing(threshold=threshold), rows)
    dense, _ = moa_attention(prior_out, *args, attn, DENSE, rows)
    assert batches == [r1.shape[0] - 1]
    batch_rows = torch.arange(B) if rows is None else rows
    assert torch.equal(out[batch_rows[dead]], prior_out[batch_rows[dead]])
    kept = (r1 > threshold)[..., None].expand(-1, -1, C)
    torch.testing.assert_close(out[batch_rows][kept], dense[batch_rows][kept], **TOL)


def test_a_personal_expert_known_to_be_the_prior_is_not_run_and_the_router_still_is(attention, perturb):
    prior_out, (x, context, value, prior, layer, attn) = layer_case(perturb, attention, cross=True)
    counted, calls = counting(attn)
    _, r1 = moa_attention(prior_out, x, context, value, prior, layer, counted)
    out, r1_skipped = moa_attention(prior_out, x, context, value, prior, layer, counted, personal_is_prior=True)
    assert out is prior_out and len(calls) == 1
    assert torch.equal(r1_skipped, r1)  # the router maps are still recorded


@pytest.mark.parametrize("rank", [0, 4])
def test_a_layer_is_the_prior_exactly_while_every_delta_is_zero(rank):
    layer = MoALayer(SPEC, delta_rank=rank)
    assert layer.personal_is_prior()  # MoA init, whatever the router
    with torch.no_grad():
        (layer.delta_v.up if rank else layer.delta_v.weight)[0, 0] = 1e-30
    assert not layer.personal_is_prior()
