import pytest
import torch

from comfyui_moa.moa_core.layer import Delta, MoALayer
from comfyui_moa.moa_core.router import router_hidden_dim
from comfyui_moa.moa_core.unet_layout import LayerSpec

X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rank", [0, 2])
def test_untrained_delta_outputs_exact_zeros(rank):
    torch.manual_seed(0)
    delta = Delta(6, 4, rank)
    assert torch.equal(delta(X), torch.zeros(2, 5, 4))


def test_low_rank_delta_starts_with_a_random_down_projection():
    torch.manual_seed(0)
    delta = Delta(6, 4, rank=2)
    assert delta.down.shape == (2, 6) and delta.down.abs().sum() > 0  # so the up projection gets gradient
    assert delta.up.shape == (4, 2)
    assert set(delta.state_dict()) == {"down", "up"}
    assert set(Delta(6, 4).state_dict()) == {"weight"}


def test_low_rank_delta_is_x_down_t_up_t():
    torch.manual_seed(0)
    delta = Delta(6, 4, rank=2)
    with torch.no_grad():
        delta.up.normal_()
    torch.testing.assert_close(delta(X), X @ delta.down.T @ delta.up.T, rtol=1e-5, atol=1e-5)


def test_full_rank_delta_is_x_weight_t():
    delta = Delta(6, 4)
    with torch.no_grad():
        delta.weight.normal_()
    assert delta.weight.shape == (4, 6)
    torch.testing.assert_close(delta(X), X @ delta.weight.T, rtol=1e-5, atol=1e-5)


def test_delta_output_dtype_follows_the_input():
    delta = Delta(6, 4)
    with torch.no_grad():
        delta.weight.normal_()
    out = delta(X.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, X.double() @ delta.weight.double().T, rtol=1e-12, atol=1e-12)


SPEC = LayerSpec("input_blocks.1.1.transformer_blocks.0.attn2", query_dim=8, context_dim=12, inner_dim=10)


def test_moa_layer_full_rank_shapes_follow_the_layer_spec():
    layer = MoALayer(SPEC, router_ratio=0.5)
    assert layer.delta_q.weight.shape == (10, 8)
    assert layer.delta_k.weight.shape == (10, 12)
    assert layer.delta_v.weight.shape == (10, 12)
    assert layer.delta_out.weight.shape == (8, 10)
    assert layer.router.fc1.weight.shape == (4, 8)
    assert layer.router.fc2.weight.shape == (2, 4)


def test_moa_layer_low_rank_shapes_follow_the_layer_spec():
    layer = MoALayer(SPEC, delta_rank=3)
    for delta, (in_dim, out_dim) in (
        (layer.delta_q, (8, 10)),
        (layer.delta_k, (12, 10)),
        (layer.delta_v, (12, 10)),
        (layer.delta_out, (10, 8)),
    ):
        assert delta.down.shape == (3, in_dim)
        assert delta.up.shape == (out_dim, 3)
    assert layer.router.fc1.weight.shape == (router_hidden_dim(8, 0.25), 8)


def test_moa_layer_router_uses_prior_init():
    layer = MoALayer(SPEC, prior_init=0.8)
    r1 = layer.router.personal_weight(torch.randn(1, 3, 8))
    torch.testing.assert_close(r1, torch.full((1, 3, 1), 0.2), rtol=1e-6, atol=1e-6)
