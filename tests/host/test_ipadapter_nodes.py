"""Tier 2: the IP-Adapter nodes as ComfyUI calls them: files from models/ipadapter, subjects from
MoA Subject fed a ViT-H-sized CLIP vision, and bad input refused by name with nothing applied."""

import subprocess
import sys

import folder_paths
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention

from comfyui_moa.moa_core import ConditioningError, WeightsFormatError, WeightsMismatchError
from comfyui_moa.moa_core.ipadapter import FULL_FACE, HIDDEN_STATES, IMAGE_EMBEDS, LINEAR, PLUS
from comfyui_moa.nodes import NODE_CLASS_MAPPINGS as NODES
from comfyui_moa.nodes.host import folders
from comfyui_moa.nodes.host.ipadapter import CONVERTER, cross_attention_paths
from comfyui_moa.nodes.host.patch import has_moa
from moa_testing import ipadapter_files
from moa_testing.ipadapter import tiny_clip_vision_h
from moa_testing.tiny import full_model_on_meta, sample, text_cond, tiny_clip, tiny_clip_vision, tiny_sd15

# the names users have, and what each is
SD15_FILES = {
    "ip-adapter_sd15.safetensors": ("sd15", LINEAR, IMAGE_EMBEDS, 4),
    "ip-adapter_sd15_light_v11.safetensors": ("light_v11", LINEAR, IMAGE_EMBEDS, 4),
    "ip-adapter-plus_sd15.safetensors": ("plus", PLUS, HIDDEN_STATES, 16),
    "ip-adapter-plus-face_sd15.safetensors": ("plus-face", PLUS, HIDDEN_STATES, 16),
    "ip-adapter-full-face_sd15.safetensors": ("full-face", FULL_FACE, HIDDEN_STATES, 257),
}
APPLY = NODES["MoAIPAdapterApply"]
TEXT = "a photo of a man and a woman in a cafe"


@pytest.fixture(scope="module")
def ipadapter_folder(tmp_path_factory):
    """models/ipadapter with the five SD1.5 files at their real shapes, IP-Adapters for the tiny
    model, an SDXL one, a pickled one and a file that is no IP-Adapter."""
    folder = tmp_path_factory.mktemp("ipadapter")
    for name, (kind, *_) in SD15_FILES.items():
        ipadapter_files.write(ipadapter_files.sd15_state_dict(kind), folder / name)
    model = tiny_sd15()
    for kind in ("sd15", "plus", "full-face"):
        ipadapter_files.write(ipadapter_files.state_dict_for(model, kind, std=0.2), folder / f"tiny_{kind}.safetensors")
    ipadapter_files.write(ipadapter_files.sd15_state_dict("sdxl"), folder / "ip-adapter_sdxl_vit-h.safetensors")
    ipadapter_files.write(ipadapter_files.sd15_state_dict("sd15"), folder / "ip-adapter_sd15.bin", pickle=True)
    ipadapter_files.write({"model.diffusion_model.out.2.weight": torch.zeros(4, 320)}, folder / "unet.safetensors")
    return folder


@pytest.fixture
def registered(ipadapter_folder, monkeypatch):
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, folders.IPADAPTER, ([str(ipadapter_folder)], {".safetensors", ".bin"})
    )
    return ipadapter_folder


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def vit_h(tmp_path_factory):
    return tiny_clip_vision_h(tmp_path_factory.mktemp("vit_h"))


@pytest.fixture
def model():
    return tiny_sd15()


def photo(seed: int) -> torch.Tensor:
    return torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(seed))


def two_subjects(clip_vision):
    first, _ = NODES["MoASubject"].encode(photo(1), clip_vision, "largest face", 0.3)
    both, _ = NODES["MoASubject"].encode(photo(2), clip_vision, "largest face", 0.3, subjects=first)
    return both


def apply(model, adapter, clip, subjects, text=TEXT, words="man, woman", **options):
    settings = {"weight": 1.0, "weight_type": "linear", "start_percent": 0.0, "end_percent": 1.0} | options
    return APPLY.apply(model, adapter, clip, text, words, subjects, **settings)


def untouched(model) -> bool:
    return not has_moa(model) and not model.model_options.get("transformer_options", {}).get("patches")


@pytest.mark.parametrize("name", list(SD15_FILES))
def test_each_sd15_file_kind_loads_from_models_ipadapter_with_its_real_keys_and_shapes(registered, name):
    _, kind, output, tokens = SD15_FILES[name]
    assert name in folder_paths.get_filename_list(folders.IPADAPTER)
    (patcher,) = NODES["MoAIPAdapterLoader"].load(name)
    adapter = patcher.model
    spec = adapter.spec
    assert (spec.kind, spec.family, spec.encoder_output, spec.tokens) == (kind, "sd15", output, tokens)
    assert spec.layer_dims == ipadapter_files.SD15_LAYER_DIMS and spec.encoder_name == "CLIP ViT-H/14"
    assert list(adapter.state_dict()) == list(ipadapter_files.sd15_state_dict(SD15_FILES[name][0]))  # the file's keys
    clip_output = torch.randn(2, 1024) if output == IMAGE_EMBEDS else torch.randn(2, 257, 1280)
    assert adapter.image_tokens(clip_output).shape == (2, tokens, 768)


def test_a_pickled_file_is_never_opened_and_the_error_gives_the_command_that_converts_it(registered, tmp_path):
    with pytest.raises(WeightsFormatError, match="ipadapter_name: ip-adapter_sd15.bin is a pickle") as error:
        NODES["MoAIPAdapterLoader"].load("ip-adapter_sd15.bin")
    assert str(CONVERTER) in str(error.value)
    source = tmp_path / "ip-adapter_sd15.bin"
    source.write_bytes((registered / "ip-adapter_sd15.bin").read_bytes())
    result = subprocess.run([sys.executable, str(CONVERTER), str(source)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    converted, original = (
        load_file(str(tmp_path / "ip-adapter_sd15.safetensors")),
        load_file(str(registered / "ip-adapter_sd15.safetensors")),
    )
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)


def test_a_file_that_is_no_ip_adapter_is_refused_by_name(registered):
    with pytest.raises(WeightsFormatError, match="ipadapter_name: this file is not an IP-Adapter"):
        NODES["MoAIPAdapterLoader"].load("unet.safetensors")


def test_subjects_in_their_places_change_the_image_and_weight_zero_is_the_base_model(
    registered, model, clip, vit_h, tmp_path, monkeypatch
):
    (adapter,) = NODES["MoAIPAdapterLoader"].load("tiny_plus.safetensors")
    subjects = two_subjects(vit_h)
    assert subjects[0].hidden_states.shape == (257, 1280)
    negative = text_cond(9)
    patched, positive, record = apply(model, adapter, clip, subjects, clip_vision=vit_h, router_warmup=0.0)
    base = sample(model, positive, negative, steps=4)
    samples = sample(patched, positive, negative, steps=4)
    assert (samples - base).abs().max() > 1e-3
    assert record.runs == 1 and record.steps() and set(record.layers()) <= set(range(len(record.layer_paths)))
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    latent = {"samples": samples}  # the sampler's LATENT: Router Masks reads the run that made it
    shown = NODES["MoARouterMasks"].render(record, latent, "cross-attention", 0.0, 1.0)
    _, mask, _ = shown["result"]
    assert mask.shape == (1, 256, 256) and 0.0 <= float(mask.min()) <= float(mask.max()) <= 1.0
    off, positive_off, _ = apply(model, adapter, clip, subjects, clip_vision=vit_h, weight=0.0)
    assert torch.equal(sample(off, positive_off, negative, steps=4), base)


@pytest.mark.parametrize("kind", ["sd15", "full-face"])
def test_linear_and_full_face_adapters_apply_through_the_nodes(registered, model, clip, vit_h, kind):
    (adapter,) = NODES["MoAIPAdapterLoader"].load(f"tiny_{kind}.safetensors")
    patched, positive, _ = apply(
        model, adapter, clip, two_subjects(vit_h), clip_vision=vit_h, router="personal everywhere"
    )
    negative = text_cond(9)
    assert (sample(patched, positive, negative) - sample(model, positive, negative)).abs().max() > 1e-3


class OtherPackReplace:
    """What ComfyUI_IPAdapter_plus puts in the attn2 replace slot: attention plus attention to extra tokens."""

    calls = 0

    def __init__(self):
        generator = torch.Generator().manual_seed(5)
        self.tokens = {dim: torch.randn(1, 4, dim, generator=generator) for dim in (32, 64)}

    def __call__(self, q, k, v, extra_options):
        OtherPackReplace.calls += 1
        heads = extra_options["n_heads"]
        extra = self.tokens[q.shape[-1]].expand(q.shape[0], -1, -1)
        return optimized_attention(q, k, v, heads) + 0.5 * optimized_attention(q, extra, extra, heads)

    def __deepcopy__(self, memo):
        return self


def test_an_ipadapter_plus_style_attn2_replace_in_the_same_graph_still_takes_effect(registered, model, clip, vit_h):
    from comfyui_moa.moa_core import block_key

    other = model.clone()
    replace = OtherPackReplace()
    for path in cross_attention_paths(model):
        name, block_id, index = block_key(path.rsplit(".", 1)[0])
        other.set_model_attn2_replace(replace, name, block_id, index)
    (adapter,) = NODES["MoAIPAdapterLoader"].load("tiny_plus.safetensors")
    subjects, negative = two_subjects(vit_h), text_cond(9)
    ours, positive, _ = apply(model, adapter, clip, subjects, clip_vision=vit_h, router="personal everywhere")
    both, _, _ = apply(other, adapter, clip, subjects, clip_vision=vit_h, router="personal everywhere")
    OtherPackReplace.calls = 0
    with_both = sample(both, positive, negative, steps=2)
    assert OtherPackReplace.calls == 2 * 4  # every cross-attention layer, every step
    assert (with_both - sample(ours, positive, negative, steps=2)).abs().max() > 1e-4
    prior, _, _ = apply(other, adapter, clip, subjects, clip_vision=vit_h, router="prior everywhere")
    assert torch.equal(sample(prior, positive, negative, steps=2), sample(other, positive, negative, steps=2))


def test_an_sdxl_ip_adapter_on_an_sd15_model_is_refused_and_nothing_is_applied(registered, model, clip, vit_h):
    (adapter,) = NODES["MoAIPAdapterLoader"].load("ip-adapter_sdxl_vit-h.safetensors")
    with pytest.raises(WeightsMismatchError, match="ipadapter: this IP-Adapter is for sdxl models .* model is sd15"):
        apply(model, adapter, clip, two_subjects(vit_h), clip_vision=vit_h)
    assert untouched(model)


def test_a_real_sd15_file_on_a_model_with_other_layers_is_refused(registered, model, clip, vit_h):
    (adapter,) = NODES["MoAIPAdapterLoader"].load("ip-adapter_sd15.safetensors")
    with pytest.raises(WeightsMismatchError, match="16 cross-attention layers .* the model 4"):
        apply(model, adapter, clip, two_subjects(vit_h))
    assert untouched(model)


def test_vit_l_subjects_for_a_vit_h_adapter_are_refused_with_the_model_to_load(registered, model, clip, tmp_path):
    vit_l = tiny_clip_vision(tmp_path, projection_dim=768)
    for name in ("tiny_sd15.safetensors", "tiny_plus.safetensors"):
        (adapter,) = NODES["MoAIPAdapterLoader"].load(name)
        with pytest.raises(WeightsMismatchError, match="subjects: subject 1 was encoded by .* Load CLIP ViT-H/14"):
            apply(model, adapter, clip, two_subjects(vit_l))
    assert untouched(model)


def test_word_and_input_errors_name_the_input_and_leave_the_model_alone(registered, model, clip, vit_h):
    (adapter,) = NODES["MoAIPAdapterLoader"].load("tiny_plus.safetensors")
    subjects = two_subjects(vit_h)
    with pytest.raises(ConditioningError, match="subject_words: 'child' is not in the prompt"):
        apply(model, adapter, clip, subjects, words="man, child", clip_vision=vit_h)
    with pytest.raises(ValueError, match="subject_words: 1 word"):
        apply(model, adapter, clip, subjects, words="man", clip_vision=vit_h)
    with pytest.raises(ConditioningError, match="clip_vision: a plus IP-Adapter .* black image"):
        apply(model, adapter, clip, subjects)
    with pytest.raises(WeightsFormatError, match="weight_type: 'composition' is defined on SD1.5's 16"):
        apply(model, adapter, clip, subjects, weight_type="composition", clip_vision=vit_h)
    assert untouched(model)
    patched, _, _ = apply(model, adapter, clip, subjects, clip_vision=vit_h)
    with pytest.raises(ValueError, match="model: this model already has MoA applied"):
        apply(patched, adapter, clip, subjects, clip_vision=vit_h)


def test_the_ipadapter_expert_swaps_a_photos_subject_and_keep_outside_reads_its_attention_router(
    registered, model, clip, vit_h
):
    """The photo swap with files artists have: MoA Invert, the IP-Adapter expert, MoA Regenerate. The
    attention router records no maps in its warmup (the first fifth of the steps), so keep_outside holds
    the whole photo there and then follows the maps (on the tiny random model: every pixel the subject's,
    so nothing is held after the warmup)."""
    (adapter,) = NODES["MoAIPAdapterLoader"].load("tiny_plus.safetensors")
    subjects, _ = NODES["MoASubject"].encode(photo(1), vit_h, "largest face", 0.3)
    negative = text_cond(9)
    options = {"clip_vision": vit_h, "text": "a photo of a man on a beach", "words": "man"}
    smooth = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    latent = torch.nn.functional.interpolate(smooth, size=(32, 32), mode="bicubic") * 5.0
    patched, positive, _ = apply(model, adapter, clip, subjects, **options)
    (inversion,) = NODES["MoAInvert"].invert(model, positive, negative, {"samples": latent}, 10, "normal", 1.0, 2)
    (back,) = NODES["MoARegenerate"].regenerate(model, positive, negative, inversion, False)
    assert (back["samples"] - latent).norm() < 1e-4 * latent.norm()
    (free,) = NODES["MoARegenerate"].regenerate(patched, positive, negative, inversion, False)
    patched, positive, record = apply(model, adapter, clip, subjects, **options)
    (kept,) = NODES["MoARegenerate"].regenerate(patched, positive, negative, inversion, True, router_record=record)
    assert record.steps() == list(range(2, 10)), "the router acts after its warmup, 2 of 10 steps"
    last = record.stack((32, 32), record.layers(), [9], batch=1)[0].mean(0)[0]
    assert last.min() > 0.5
    # the warmup's held walk is the photo's, which the prior (alone in the warmup) follows anyway
    free, kept = free["samples"], kept["samples"]
    assert (free - latent).abs().mean() > 1e-3
    assert (kept - free).norm() < 1e-3 * (free - latent).norm()


# SDXL: the published files' shapes against the full SDXL UNet (on the meta device: layout, no
# weights), and the nodes end to end on a tiny SDXL with its two text encoders.


@pytest.mark.parametrize("name", list(ipadapter_files.SDXL_FILES))
def test_each_published_sdxl_file_reads_as_its_kind_and_fits_sdxls_70_layers_in_file_order(name):
    from comfyui_moa.moa_core.ipadapter import read_spec
    from comfyui_moa.nodes.host.attention_router import cross_attention_levels, read_level
    from comfyui_moa.nodes.host.ipadapter import _RUN_ORDER, _order, check_adapter_fits, transformer_indices

    spec, keys = read_spec(ipadapter_files.sdxl_state_dict(name), "ipadapter")
    kind = ipadapter_files.SDXL_FILES[name][0]
    plus = (PLUS, HIDDEN_STATES, 16)
    expected = {"sd15": (LINEAR, IMAGE_EMBEDS, 4), "plus": plus, "plus-face": plus}[kind]
    assert (spec.kind, spec.encoder_output, spec.tokens) == expected and spec.family == "sdxl"
    assert spec.encoder_name == ("CLIP ViT-bigG/14" if name == "ip-adapter_sdxl.safetensors" else "CLIP ViT-H/14")
    model = full_model_on_meta("sdxl")
    paths = check_adapter_fits(model, spec, "ipadapter")
    assert len(paths) == len(keys) == 70 and keys[-1] == "139"
    named = {0: "input_blocks.4.1", 4: "input_blocks.7.1", 24: "output_blocks.0.1", 54: "output_blocks.3.1"}
    named |= {60: "middle_block.1"}
    assert {i: paths[i] for i in named} == {i: f"{p}.transformer_blocks.0.attn2" for i, p in named.items()}
    assert transformer_indices(_order(paths, _RUN_ORDER)) == ipadapter_files.SDXL_TRANSFORMERS
    # the attention router reads the 32x32 layers at 1024 px (level 2): input 7, 8, middle, output 0-2
    levels = cross_attention_levels(model)
    assert read_level(model, 4) == 2 and sum(level == 2 for level in levels.values()) == 60
    with pytest.raises(WeightsMismatchError, match="for sdxl models .* model is sd15; .* ip-adapter-plus_sd15"):
        check_adapter_fits(full_model_on_meta("sd15"), spec, "ipadapter")


@pytest.fixture(scope="module")
def sdxl_setup(tmp_path_factory):
    """A tiny SDXL, its CLIP, and models/ipadapter with plus and linear adapters for it and an SD1.5 one."""
    from moa_testing.tiny import tiny_sdxl, tiny_sdxl_clip

    folder = tmp_path_factory.mktemp("ipadapter_sdxl")
    model = tiny_sdxl()
    for kind in ("plus", "sd15"):
        state = ipadapter_files.state_dict_for(model, kind, std=0.2)
        ipadapter_files.write(state, folder / f"tiny_sdxl_{kind}.safetensors")
    ipadapter_files.write(ipadapter_files.state_dict_for(tiny_sd15(), "plus"), folder / "tiny_sd15_plus.safetensors")
    return folder, tiny_sdxl_clip()


def test_sdxl_adapters_apply_through_the_nodes_with_words_in_both_text_streams(sdxl_setup, vit_h, monkeypatch):
    from moa_testing.tiny import family_cond, tiny_sdxl

    folder, clip = sdxl_setup
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folders.IPADAPTER, ([str(folder)], {".safetensors"}))
    model, negative, subjects = tiny_sdxl(), family_cond("sdxl", 9), two_subjects(vit_h)
    for kind in ("plus", "sd15"):
        (adapter,) = NODES["MoAIPAdapterLoader"].load(f"tiny_sdxl_{kind}.safetensors")
        assert adapter.model.spec.family == "sdxl" and adapter.model.spec.context_dim == 2048
        patched, positive, record = apply(model, adapter, clip, subjects, clip_vision=vit_h, router_warmup=0.0)
        assert positive[0][0].shape[-1] == 2048 and "pooled_output" in positive[0][1]
        base = sample(model, positive, negative, steps=4)
        assert (sample(patched, positive, negative, steps=4) - base).abs().max() > 1e-3, kind
        assert record.runs == 1 and len(record.layers()) == len(cross_attention_paths(model))
        off, positive_off, _ = apply(model, adapter, clip, subjects, clip_vision=vit_h, weight=0.0)
        assert torch.equal(sample(off, positive_off, negative, steps=4), base)
    with pytest.raises(WeightsFormatError, match="weight_type: 'style transfer' is defined on .* SDXL's 11"):
        apply(model, adapter, clip, subjects, clip_vision=vit_h, weight_type="style transfer")
    (sd15,) = NODES["MoAIPAdapterLoader"].load("tiny_sd15_plus.safetensors")
    with pytest.raises(WeightsMismatchError, match="for sd15 models .* model is sdxl; .* ip-adapter-plus_sdxl_vit-h"):
        apply(model, sd15, clip, subjects, clip_vision=vit_h)
    assert untouched(model)
