import pytest
import torch
import torch.nn.functional as F

from comfyui_moa.moa_core.router import Router, router_hidden_dim

TOL = {"rtol": 1e-6, "atol": 1e-6}


def hidden(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("prior_init", [0.9, 0.5, 0.25])
def test_untrained_router_gives_every_pixel_prior_init(prior_init):
    torch.manual_seed(0)
    router = Router(8, 4, prior_init)
    weights = router(hidden())
    assert weights.shape == (2, 7, 2)
    torch.testing.assert_close(weights[..., 0], torch.full((2, 7), prior_init), **TOL)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7), **TOL)
    torch.testing.assert_close(router.personal_weight(hidden(1)), torch.full((2, 7, 1), 1.0 - prior_init), **TOL)


def test_trained_router_varies_across_pixels_and_still_sums_to_one(perturb):
    router = perturb(Router(8, 4), seed=1)
    x = hidden()
    weights = router(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7), **TOL)
    assert weights[..., 1].std() > 1e-2
    assert ((weights >= 0) & (weights <= 1)).all()
    # reference: softmax of a two-layer GELU MLP
    expected = F.linear(F.gelu(F.linear(x, router.fc1.weight, router.fc1.bias)), router.fc2.weight, router.fc2.bias)
    torch.testing.assert_close(weights, expected.softmax(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(router.personal_weight(x), weights[..., 1:])


def test_untrained_router_passes_gradient_to_its_last_layer():
    torch.manual_seed(0)
    router = Router(8, 4)
    router.personal_weight(hidden()).sum().backward()
    assert router.fc2.weight.grad.abs().sum() > 0  # training can leave the constant


def test_gradients_reach_both_layers_after_a_perturbation():
    torch.manual_seed(0)
    router = Router(8, 4)
    with torch.no_grad():
        router.fc2.weight.add_(torch.randn(router.fc2.weight.shape))
    router.personal_weight(hidden()).pow(2).sum().backward()
    for param in (router.fc1.weight, router.fc1.bias, router.fc2.weight, router.fc2.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_output_dtype_follows_the_input(perturb):
    router = perturb(Router(8, 4), seed=2)
    x64 = hidden(dtype=torch.float64)
    out = router(x64)
    assert out.dtype == torch.float64
    assert router.fc1.weight.dtype == torch.float32  # weights are cast per call, not converted in place
    torch.testing.assert_close(out.float(), router(x64.float()), rtol=1e-5, atol=1e-6)


def test_router_hidden_dim_is_the_ratio_of_the_width_and_at_least_one():
    assert router_hidden_dim(320, 0.25) == 80
    assert router_hidden_dim(1280, 0.5) == 640
    assert router_hidden_dim(2, 0.1) == 1
