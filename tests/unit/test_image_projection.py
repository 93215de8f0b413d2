"""The image projections equal IP-Adapter's published forward, restated here from the paper's
reference implementation's structure, on state dicts with the files' own keys and shapes."""

import math

import torch
import torch.nn.functional as F

from comfyui_moa.moa_core.image_projection import LinearProjection, Resampler, TokenMLP, resampler_shape
from moa_testing.ipadapter_files import image_proj

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32, the same operations in another order


def loaded(module, state):
    module.load_state_dict(state)
    return module.eval()


def reference_resampler(state: dict, x: torch.Tensor, heads: int = 12) -> torch.Tensor:
    """tencent-ailab/IP-Adapter's Resampler: each layer's PerceiverAttention scales q and k by
    d^-1/4 each, keys and values from [image; latents], then a residual feed-forward."""

    def layer_norm(t, prefix):
        return F.layer_norm(t, t.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    def split(t):
        b, n, _ = t.shape
        return t.view(b, n, heads, -1).transpose(1, 2)

    latents = state["latents"].repeat(x.shape[0], 1, 1)
    x = F.linear(x, state["proj_in.weight"], state["proj_in.bias"])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    for i in range(depth):
        p = f"layers.{i}"
        image, normed = layer_norm(x, f"{p}.0.norm1"), layer_norm(latents, f"{p}.0.norm2")
        q = F.linear(normed, state[f"{p}.0.to_q.weight"])
        k, v = F.linear(torch.cat((image, normed), dim=-2), state[f"{p}.0.to_kv.weight"]).chunk(2, dim=-1)
        q, k, v = split(q), split(k), split(v)
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
        latents = F.linear(out, state[f"{p}.0.to_out.weight"]) + latents
        hidden = F.gelu(F.linear(layer_norm(latents, f"{p}.1.0"), state[f"{p}.1.1.weight"]))
        latents = F.linear(hidden, state[f"{p}.1.3.weight"]) + latents
    latents = F.linear(latents, state["proj_out.weight"], state["proj_out.bias"])
    return layer_norm(latents, "norm_out")


def test_resampler_of_the_plus_files_equals_the_published_forward():
    state = image_proj("plus")
    shape = resampler_shape(state)
    assert shape == {
        "embed_dim": 1280, "token_dim": 768, "tokens": 16, "depth": 4, "heads": 12, "head_dim": 64, "width": 768,
        "ff_mult": 4,
    }  # fmt: skip
    resampler = loaded(Resampler(**shape), state)
    x = torch.randn(2, 257, 1280, generator=torch.Generator().manual_seed(1))
    out = resampler(x)
    assert out.shape == (2, 16, 768)
    torch.testing.assert_close(out, reference_resampler(state, x), **TOLERANCE)


def test_linear_projection_of_the_sd15_files_is_four_layer_normed_tokens():
    state = image_proj("sd15")
    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(2))
    out = loaded(LinearProjection(1024, 768, 4), state)(x)
    tokens = F.linear(x, state["proj.weight"], state["proj.bias"]).reshape(3, 4, 768)
    expected = F.layer_norm(tokens, (768,), state["norm.weight"], state["norm.bias"])
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_full_face_projection_is_a_per_token_mlp():
    state = image_proj("full-face")
    x = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(3))
    out = loaded(TokenMLP(1280, 768), state)(x)
    hidden = F.gelu(F.linear(x, state["proj.0.weight"], state["proj.0.bias"]))
    tokens = F.linear(hidden, state["proj.2.weight"], state["proj.2.bias"])
    expected = F.layer_norm(tokens, (768,), state["proj.3.weight"], state["proj.3.bias"])
    assert out.shape == (1, 257, 768)
    torch.testing.assert_close(out, expected, **TOLERANCE)
