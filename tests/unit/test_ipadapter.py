"""IP-Adapter files read from their keys and shapes; the expert's mixture; per-layer presets."""

import pytest
import torch

from comfyui_moa.moa_core.errors import WeightsFormatError
from comfyui_moa.moa_core.ipadapter import build_ipadapter, layer_weights, load_ipadapter, read_spec
from comfyui_moa.moa_core.mixture import image_attention_difference, mix_differences
from moa_testing.ipadapter_files import SD15_LAYER_DIMS, SDXL_TRANSFORMERS, sd15_state_dict, state_dict_with, write


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("sd15", ("linear", "image_embeds", 1024, 4)),
        ("plus", ("plus", "penultimate_hidden_states", 1280, 16)),
        ("full-face", ("full-face", "penultimate_hidden_states", 1280, 257)),
    ],
)
def test_the_kind_comes_from_the_keys_and_shapes(kind, expected):
    spec, keys = read_spec(sd15_state_dict(kind), "f")
    assert (spec.kind, spec.encoder_output, spec.encoder_dim, spec.tokens) == expected
    assert spec.family == "sd15" and spec.layer_dims == SD15_LAYER_DIMS
    assert keys == [str(n) for n in range(1, 32, 2)]


def test_sdxl_files_are_told_apart_by_their_text_width():
    spec, _ = read_spec(sd15_state_dict("sdxl"), "f")
    assert spec.family == "sdxl" and spec.context_dim == 2048


def test_faceid_and_foreign_and_damaged_files_are_refused_by_name():
    faceid = {"image_proj.proj.0.weight": torch.zeros(1), "ip_adapter.1.to_k_lora.down.weight": torch.zeros(1)}
    with pytest.raises(WeightsFormatError, match="input: this is a FaceID IP-Adapter"):
        read_spec(faceid, "input")
    with pytest.raises(WeightsFormatError, match="input: this file is not an IP-Adapter"):
        read_spec({"model.diffusion_model.x": torch.zeros(1)}, "input")
    damaged = sd15_state_dict("plus")
    damaged.pop("image_proj.layers.3.1.3.weight")
    with pytest.raises(WeightsFormatError, match="input: this plus IP-Adapter file is incomplete"):
        build_ipadapter(damaged, "input")


def test_pickles_are_refused_with_the_command_and_safetensors_load(tmp_path):
    state = state_dict_with((32, 64), "sd15")
    pickled = write(state, tmp_path / "a.bin", pickle=True)
    with pytest.raises(WeightsFormatError, match=r'a.bin is a pickle .* with: convert "\S*a.bin"'):
        load_ipadapter(pickled, "name", "convert")
    adapter = load_ipadapter(write(state, tmp_path / "a.safetensors"), "name", "convert")
    assert torch.equal(adapter.layers[1].to_v_ip.weight, state["ip_adapter.3.to_v_ip.weight"].half().float())


def test_presets_follow_ipadapter_plus_on_sd15s_sixteen_layers():
    assert layer_weights("linear", 0.7, range(4), None, "w") == [0.7] * 4
    composition = layer_weights("composition", 0.8, range(16), "sd15", "w")
    assert composition[4] == 0.2 and composition[5] == 0.8 and sum(w > 0 for w in composition) == 2
    style = layer_weights("style transfer", 1.0, range(16), "sd15", "w")
    assert [i for i, w in enumerate(style) if w] == [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(WeightsFormatError, match="w: 'style transfer' is defined on SD1.5's 16 .* model has 4"):
        layer_weights("style transfer", 1.0, range(4), "sd15", "w")


def test_sdxl_presets_are_instantstyles_blocks_with_every_layer_of_the_block():
    assert layer_weights("linear", 0.5, SDXL_TRANSFORMERS, "sdxl", "w") == [0.5] * 70
    style = layer_weights("style transfer", 0.9, SDXL_TRANSFORMERS, "sdxl", "w")
    assert [i for i, w in enumerate(style) if w] == list(range(44, 54)) and max(style) == 0.9  # output block 1
    composition = layer_weights("composition", 1.0, SDXL_TRANSFORMERS, "sdxl", "w")
    assert [i for i, w in enumerate(composition) if w] == list(range(14, 24))  # input block 8
    with pytest.raises(WeightsFormatError, match="w: 'composition' is defined on .* SDXL's 11 .* model has 3"):
        layer_weights("composition", 1.0, [0, 0, 1, 1, 2], "sdxl", "w")


def attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_the_mixture_is_prior_plus_the_weighted_experts_and_exactly_the_prior_where_all_weights_are_zero():
    g = torch.Generator().manual_seed(0)
    prior, q = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    keys, values = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 4, 8, generator=g)
    w = torch.rand(3, 2, 6, 1, generator=g)
    w[:, :, :2] = 0.0
    out_matrix = torch.randn(8, 8, generator=g)
    mixed = mix_differences(prior, image_attention_difference(q, keys, values, w, attention) @ out_matrix.T)
    expected = prior + sum(w[i] * (attention(q, keys[i], values[i]) @ out_matrix.T) for i in range(3))
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed[:, :2], prior[:, :2])
    rows, pixels = torch.tensor([1]), torch.tensor([3, 5])
    sparse = mix_differences(prior, torch.ones(1, 2, 8), rows, pixels)
    assert torch.equal(sparse[1, [3, 5]], prior[1, [3, 5]] + 1) and torch.equal(sparse[0], prior[0])
