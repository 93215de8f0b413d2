import pytest
import torch
from torch import nn

from comfyui_moa.moa_core.layer import Delta, MoALayer
from comfyui_moa.moa_core.mixture import PriorProjections, RouterMode, mix, moa_attention, personal_attention
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
    out, r1 = moa_attention(prior_out, *args, strength=0.0)
    assert torch.equal(out, prior_out)
    assert (r1 > 0).all()  # r1 is reported before strength


def test_strength_scales_the_personal_share(attention, perturb):
    lin, (x, context) = linears(), data()
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), trained_layer(perturb), attention(HEADS))
    full, _ = moa_attention(prior_out, *args)
    half, _ = moa_attention(prior_out, *args, strength=0.5)
    torch.testing.assert_close(half - prior_out, 0.5 * (full - prior_out), **TOL)


def test_router_mode_prior_gives_prior_bit_for_bit(attention, perturb):
    lin, (x, context) = linears(), data()
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), trained_layer(perturb), attention(HEADS))
    out, r1 = moa_attention(prior_out, *args, router_mode=RouterMode.PRIOR)
    assert torch.equal(out, prior_out)
    assert torch.equal(r1, torch.zeros(B, N, 1))


def test_router_mode_personal_gives_the_personal_expert(attention, perturb):
    lin, (x, context) = linears(), data()
    layer = trained_layer(perturb)
    prior_out = host_attention(lin, attention(HEADS), x, context)
    args = (x, context, context, prior_of(lin), layer, attention(HEADS))
    out, r1 = moa_attention(prior_out, *args, router_mode=RouterMode.PERSONAL)
    assert torch.equal(r1, torch.ones(B, N, 1))
    torch.testing.assert_close(out, personal_attention(*args), **TOL)


@pytest.mark.parametrize("mode", list(RouterMode))
def test_untrained_layer_gives_prior_bit_for_bit_whatever_the_router(attention, perturb, mode):
    lin, (x, context) = linears(), data()
    layer = MoALayer(SPEC)
    perturb(layer.router, seed=3)  # a router far from its init; the deltas stay zero
    prior_out = host_attention(lin, attention(HEADS), x, context)
    out, _ = moa_attention(prior_out, x, context, context, prior_of(lin), layer, attention(HEADS), router_mode=mode)
    assert torch.equal(out, prior_out)
