import json
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_moa.moa_core.errors import WeightsFormatError
from comfyui_moa.moa_core.fuser import FuserConfig
from comfyui_moa.moa_core.unet_layout import LayerSpec
from comfyui_moa.moa_core.weights import ImageEncoderSpec, MoAWeights, load_weights, moa_init, read_config, save_weights

LAYERS = [
    LayerSpec("input_blocks.1.1.transformer_blocks.0.attn1", 8, 8, 8),
    LayerSpec("input_blocks.1.1.transformer_blocks.0.attn2", 8, 12, 8),
    LayerSpec("middle_block.1.transformer_blocks.0.attn1", 16, 16, 16),
    LayerSpec("middle_block.1.transformer_blocks.0.attn2", 16, 12, 16),
]
FUSER = FuserConfig(text_dim=12, image_dim=6, hidden_dim=8, cond_dim=4)
ENCODER = ImageEncoderSpec("tiny-encoder", "image_embeds", 6)
LAYER_PARAMS = ["router.fc1.weight", "router.fc1.bias", "router.fc2.weight", "router.fc2.bias"]
FULL_RANK = ["delta_q.weight", "delta_k.weight", "delta_v.weight", "delta_out.weight"]
LOW_RANK = [f"delta_{p}.{m}" for p in ("q", "k", "v", "out") for m in ("down", "up")]
FUSER_PARAMS = ["time_proj.weight", "time_proj.bias", "layer_embedding.weight", "norm.weight", "norm.bias"]
FUSER_PARAMS += [f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]


def untrained(rank: int = 0, **kwargs) -> MoAWeights:
    torch.manual_seed(0)
    return moa_init("sd15", LAYERS, FUSER, ENCODER, delta_rank=rank, **kwargs)


@pytest.fixture
def trained(perturb) -> MoAWeights:
    weights = perturb(untrained(), seed=5, std=0.5)
    weights.config.training["steps"] = 3
    return weights


@pytest.fixture
def saved(tmp_path, trained):
    path = tmp_path / "moa.safetensors"
    save_weights(trained, path)
    return path


# --- moa_init ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 2])
def test_moa_init_deltas_are_zero_and_routers_give_prior_init(rank):
    weights = untrained(rank, prior_init=0.75)
    for layer, spec in zip(weights.layers, LAYERS, strict=True):
        for delta, in_dim in ((layer.delta_q, spec.query_dim), (layer.delta_k, spec.context_dim)):
            assert torch.equal(delta(torch.randn(2, 3, in_dim)), torch.zeros(2, 3, spec.inner_dim))
        r1 = layer.router.personal_weight(torch.randn(2, 3, spec.query_dim))
        torch.testing.assert_close(r1, torch.full((2, 3, 1), 0.25), rtol=1e-6, atol=1e-6)


def test_moa_init_fuser_returns_the_word_token_and_indexes_the_cross_layers():
    weights = untrained()
    assert weights.config.fuser.num_layers == 2
    assert weights.config.cross_layers == [1, 3]
    assert weights.cross_index == {1: 0, 3: 1}
    word = torch.randn(2, 3, 12)
    assert torch.equal(weights.fuser(word, torch.randn(3, 6), torch.tensor([500.0]), 1), word)


def test_moa_init_defaults_the_fuser_to_the_text_and_image_widths():
    torch.manual_seed(0)
    weights = moa_init("sd15", LAYERS, image_encoder=ENCODER)
    assert (weights.config.fuser.text_dim, weights.config.fuser.image_dim) == (12, 6)


def test_moa_init_rejects_unknown_family_and_layers_without_cross_attention():
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        moa_init("sd3", LAYERS, FUSER)
    with pytest.raises(ValueError, match="at least one cross-attention layer"):
        moa_init("sd15", [LAYERS[0], LAYERS[2]], FUSER)


@pytest.mark.parametrize(
    ("fuser", "message"),
    [
        (FuserConfig(text_dim=768, image_dim=6), "it makes 768-d tokens but the cross-attention layers read [12]-d"),
        (FuserConfig(text_dim=12, image_dim=768), "it reads 768-d image embeddings but the image encoder"),
    ],
)
def test_moa_init_refuses_a_fuser_of_other_widths_than_the_layers_and_encoder(fuser, message):
    with pytest.raises(ValueError, match=re.escape(f"fuser: {message}")):
        moa_init("sd15", LAYERS, fuser, ENCODER)


# --- the file ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 2])
def test_file_keys_are_layer_paths_and_fuser_params(tmp_path, rank):
    path = tmp_path / "moa.safetensors"
    save_weights(untrained(rank), path)
    deltas = LOW_RANK if rank else FULL_RANK
    expected = {f"{spec.path}.{p}" for spec in LAYERS for p in deltas + LAYER_PARAMS}
    expected |= {f"fuser.{p}" for p in FUSER_PARAMS}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == expected
        metadata = f.metadata()
    assert metadata["format"] == "comfyui-moa" and metadata["format_version"] == "1"
    assert json.loads(metadata["config"])["family"] == "sd15"


def test_save_then_load_gives_identical_tensors_and_config(saved, trained):
    loaded = load_weights(saved)
    assert loaded.config == trained.config
    assert loaded.cross_index == trained.cross_index
    original, restored = trained.file_state_dict(), loaded.file_state_dict()
    assert set(restored) == set(original)
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name
        assert restored[name].device.type == "cpu"
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_read_config_reads_the_header(saved, trained):
    assert read_config(saved) == trained.config


def test_load_weights_converts_to_the_requested_dtype(saved, trained):
    loaded = load_weights(saved, dtype=torch.float16)
    original = trained.file_state_dict()
    for name, tensor in loaded.file_state_dict().items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, original[name].half()), name


# --- files that are not MoA weights -----------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


@pytest.mark.parametrize("loader", [load_weights, read_config])
def test_a_pickle_is_never_opened(tmp_path, loader):
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "moa.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": _Payload(str(marker))}))
    with pytest.raises(
        WeightsFormatError, match=re.escape(".ckpt files are never opened because they may hold pickled")
    ):
        loader(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["moa.ckpt", "moa.pt", "moa"])
def test_only_the_extension_decides_even_for_valid_safetensors_content(tmp_path, saved, name):
    disguised = tmp_path / name
    disguised.write_bytes(saved.read_bytes())  # valid MoA weights: refusing them shows the file is not read
    with pytest.raises(WeightsFormatError, match="never opened because they may hold pickled code"):
        load_weights(disguised)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsFormatError, match="no such file"):
        load_weights(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("loader", [load_weights, read_config])
def test_corrupt_file(tmp_path, loader):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    with pytest.raises(WeightsFormatError, match=r"corrupt\.safetensors is not a readable safetensors file"):
        loader(path)


def test_safetensors_without_metadata(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(
        WeightsFormatError, match=re.escape("lora.safetensors is not an MoA weights file (no MoA metadata)")
    ):
        load_weights(path)


def edited(config_json: str, edit) -> str:
    data = json.loads(config_json)
    edit(data)
    return json.dumps(data)


def _set(path: tuple, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _drop(path: tuple):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


# (format, format_version, edit of the config JSON or a replacement string) -> what the message must say
METADATA_CASES = {
    "wrong format": ("pytorch-lightning", "1", None, "is not an MoA weights file (format 'pytorch-lightning')"),
    "newer version": (
        "comfyui-moa",
        "2",
        None,
        "has MoA format version 2; this pack reads up to 1. Update ComfyUI-MoA",
    ),
    "version with a dot": ("comfyui-moa", "1.0", None, "format_version '1.0' is not a number"),
    "version a word": ("comfyui-moa", "one", None, "format_version 'one' is not a number"),
    "version empty": ("comfyui-moa", "", None, "format_version '' is not a number"),
    "invalid JSON": ("comfyui-moa", "1", "{family: sd15", "metadata 'config' is not valid JSON"),
    "JSON not an object": ("comfyui-moa", "1", "[1, 2]", "metadata 'config' must be a JSON object"),
    "unknown family": ("comfyui-moa", "1", _set(("family",), "flux"), "model family 'flux' is not supported"),
    "no layers": ("comfyui-moa", "1", _set(("layers",), []), "'config.layers' must be a non-empty list"),
    "layer unknown key": (
        "comfyui-moa",
        "1",
        _set(("layers", 0, "heads"), 8),
        "config.layers[0] has unknown keys ['heads']",
    ),
    "layer incomplete": ("comfyui-moa", "1", _drop(("layers", 2, "inner_dim")), "config.layers[2] is incomplete"),
    "layer not an object": ("comfyui-moa", "1", _set(("layers", 1), "attn2"), "config.layers[1] must be an object"),
    "fuser missing": ("comfyui-moa", "1", _drop(("fuser",)), "config.fuser must be an object, found NoneType"),
    "config unknown key": ("comfyui-moa", "1", _set(("lora",), 1), "metadata field config has unknown keys ['lora']"),
    "fuser layer count": (
        "comfyui-moa",
        "1",
        _set(("fuser", "num_layers"), 5),
        "the fuser indexes 5 cross-attention layers but the file has 2",
    ),
    "fuser text width": (
        "comfyui-moa",
        "1",
        _set(("fuser", "text_dim"), 2048),
        "the fuser does not fit the file's own layers (it makes 2048-d tokens but the cross-attention layers "
        "read [12]-d",
    ),
    "fuser image width": (
        "comfyui-moa",
        "1",
        _set(("fuser", "image_dim"), 768),
        "(it reads 768-d image embeddings but the image encoder 'tiny-encoder' gives 6-d)",
    ),
}


@pytest.mark.parametrize("loader", [load_weights, read_config])
@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_invalid_metadata_raises_weights_format_error_naming_the_problem(tmp_path, trained, loader, case):
    fmt, version, edit, message = METADATA_CASES[case]
    config = trained.config.to_json()
    config = edit if isinstance(edit, str) else edited(config, edit) if edit else config
    path = tmp_path / "bad.safetensors"
    tensors = {k: v.contiguous() for k, v in trained.file_state_dict().items()}
    save_file(tensors, str(path), metadata={"format": fmt, "format_version": version, "config": config})
    with pytest.raises(WeightsFormatError, match=re.escape(message)):
        loader(path)


def test_format_version_that_is_a_unicode_digit_but_no_number_raises_weights_format_error(tmp_path, trained):
    path = tmp_path / "bad.safetensors"
    metadata = {"format": "comfyui-moa", "format_version": "²", "config": trained.config.to_json()}
    save_file({k: v.contiguous() for k, v in trained.file_state_dict().items()}, str(path), metadata=metadata)
    with pytest.raises(WeightsFormatError, match="is not a number"):
        read_config(path)


def _rewrite(path, trained, edit) -> None:
    tensors = {k: v.contiguous() for k, v in trained.file_state_dict().items()}
    edit(tensors)
    metadata = {"format": "comfyui-moa", "format_version": "1", "config": trained.config.to_json()}
    save_file(tensors, str(path), metadata=metadata)


ATTN2_K = "input_blocks.1.1.transformer_blocks.0.attn2.delta_k.weight"
TENSOR_CASES = {
    "missing": (lambda t: t.pop("fuser.fc3.bias"), "1 tensors missing (first: fuser.fc3.bias)"),
    "unexpected": (
        lambda t: t.update({"fuser.fc4.weight": torch.zeros(2)}),
        "1 tensors its metadata does not declare (first: fuser.fc4.weight)",
    ),
    "wrong shape": (
        lambda t: t.update({ATTN2_K: torch.zeros(8, 13)}),
        f"1 tensors of the wrong shape (first: {ATTN2_K} is [8, 13], metadata says [8, 12])",
    ),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensors_that_do_not_match_the_metadata_raise_weights_format_error(tmp_path, trained, case):
    edit, message = TENSOR_CASES[case]
    path = tmp_path / "bad.safetensors"
    _rewrite(path, trained, edit)
    read_config(path)  # the header alone is fine
    with pytest.raises(WeightsFormatError, match=re.escape(message)):
        load_weights(path)


def test_layer_path_that_is_no_attention_layer_raises_weights_format_error(tmp_path, trained):
    bad = "input_blocks.1.1.transformer_blocks.0.proj_in"
    good = LAYERS[0].path
    tensors = {k.replace(good + ".", bad + "."): v.contiguous() for k, v in trained.file_state_dict().items()}
    config = edited(trained.config.to_json(), _set(("layers", 0, "path"), bad))
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": "comfyui-moa", "format_version": "1", "config": config})
    with pytest.raises(WeightsFormatError, match=re.escape(bad)):
        load_weights(path)
