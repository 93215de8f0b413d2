"""Tier 2: the generated model files (moa_testing.model_files) are what ComfyUI's and insightface's
own loaders make of them: an SD15 checkpoint, its ControlNet, a ViT-L CLIP vision model, an insightface
pack that finds draw_faces' squares, and MoA weights that fit the checkpoint."""

import itertools
import logging

import comfy.clip_vision
import comfy.controlnet
import comfy.sd
import comfy.supported_models
import numpy as np
import pytest
import torch

from comfyui_moa.moa_core import WeightsMismatchError, load_weights
from comfyui_moa.nodes.host.unet_layers import check_weights_fit, layer_specs
from moa_testing.fixtures import INSIGHTFACE_PACK
from moa_testing.model_files import draw_faces, write_sd15_controlnet
from moa_testing.tiny import moa_weights_for, sample, tiny_sd15


def missing_key_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ComfyUI's loaders warn about every key a file lacks (which then stays uninitialised)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "missing" in r.getMessage()]


@pytest.fixture(scope="module")
def checkpoint(sd15_checkpoint_file):
    """(model, clip, vae) as CheckpointLoaderSimple loads sd15_checkpoint_file."""
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint_file))
    return model, clip, vae


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_checkpoint_is_detected_as_sd15_and_samples(sd15_checkpoint_file, caplog):
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint_file))
    assert not missing_key_warnings(caplog)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type.name == "EPS"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    # attention in the input, middle and output blocks: layers for MoA to patch
    paths = [spec.path for spec in layer_specs(model.model.diffusion_model)]
    assert {p.split(".")[0] for p in paths} == {"input_blocks", "middle_block", "output_blocks"}
    assert len(paths) == 8

    positive, negative = encode(clip, "a photo of a cat"), encode(clip, "")
    assert positive[0][0].shape == (1, 77, 768)
    assert not torch.equal(positive[0][0], negative[0][0])  # the full CLIP-L reads the text
    latent = sample(model, positive, negative, steps=2, size=256 // 8)
    assert latent.shape == (1, 4, 32, 32) and torch.isfinite(latent).all() and latent.std() > 0
    image = vae.decode(latent)
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(image).all()
    assert image.std() > 0.05, "decoded images must vary for the server tests to compare them"


def test_controlnet_loads_for_the_checkpoint_and_changes_the_latent(checkpoint, sd15_controlnet_file, caplog):
    model, clip, _ = checkpoint
    with caplog.at_level(logging.WARNING):
        controlnet = comfy.controlnet.load_controlnet(str(sd15_controlnet_file))
    assert not missing_key_warnings(caplog)
    assert type(controlnet) is comfy.controlnet.ControlNet
    assert controlnet.control_model.model_channels == 320

    positive, negative = encode(clip, "a photo of a cat"), encode(clip, "")
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))

    def controlled(strength):  # what ControlNetApplyAdvanced does to the positive conditioning
        control = controlnet.copy().set_cond_hint(hint, strength, (0.0, 1.0))
        return [[positive[0][0], {**positive[0][1], "control": control, "control_apply_to_uncond": False}]]

    base = sample(model, positive, negative, steps=2, size=16)
    with_control = sample(model, controlled(1.0), negative, steps=2, size=16)
    at_zero_strength = sample(model, controlled(0.0), negative, steps=2, size=16)
    assert torch.isfinite(with_control).all()
    assert (with_control - base).abs().mean() > 0.1 * base.abs().mean()
    torch.testing.assert_close(at_zero_strength, base, rtol=1e-4, atol=1e-2)  # the change is the control's


def test_controlnet_for_a_loaded_models_unet_config_has_the_same_layout(checkpoint, sd15_controlnet_file, tmp_path):
    from safetensors import safe_open

    def layout(path):
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    unet_config = checkpoint[0].model.model_config.unet_config
    written = write_sd15_controlnet(tmp_path / "control.safetensors", unet_config)
    ours = layout(written)
    written.unlink()  # 31 MB that pytest would keep for 3 sessions
    assert ours == layout(sd15_controlnet_file)
    assert "zero_convs.0.0.weight" in ours


def test_clip_vision_file_is_recognised_as_vit_l(clip_vision_vitl_file, caplog):
    with caplog.at_level(logging.WARNING):
        encoder = comfy.clip_vision.load(str(clip_vision_vitl_file))
    assert encoder is not None
    assert not missing_key_warnings(caplog)
    assert encoder.image_size == 224
    assert len(encoder.model.vision_model.encoder.layers) == 24
    assert tuple(encoder.model.visual_projection.weight.shape) == (768, 1024)

    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    out = encoder.encode_image(image)
    assert out["image_embeds"].shape == (1, 768)
    assert out["penultimate_hidden_states"].shape == (1, 257, 1024)
    assert torch.isfinite(out["image_embeds"]).all() and out["image_embeds"].std() > 0


@pytest.fixture(scope="module")
def face_analysis(insightface_root):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=INSIGHTFACE_PACK, root=str(insightface_root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface's alignment calls a deprecated skimage API
@pytest.mark.parametrize(
    "squares",
    [
        [],
        [(230, 140, 48)],
        [(20, 30, 200), (300, 320, 120)],
        [(0, 0, 64), (200, 60, 150), (330, 340, 170)],
    ],
    ids=["none", "one", "two", "three"],
)
def test_insightface_finds_the_drawn_squares(face_analysis, squares):
    image = draw_faces(512, squares, seed=len(squares))
    faces = sorted(face_analysis.get(np.ascontiguousarray(image[..., ::-1])), key=lambda f: f.bbox[0])
    assert len(faces) == len(squares)
    for face, (x, y, side) in zip(faces, sorted(squares), strict=True):
        assert np.abs(face.bbox - [x, y, x + side, y + side]).max() <= 0.15 * side
        x1, y1, x2, y2 = face.bbox
        kps = face.kps
        assert kps.shape == (5, 2)
        assert ((kps[:, 0] > x1) & (kps[:, 0] < x2) & (kps[:, 1] > y1) & (kps[:, 1] < y2)).all()
        eyes, nose, mouth = kps[:2], kps[2], kps[3:]
        assert eyes[0, 0] < nose[0] < eyes[1, 0] and mouth[0, 0] < nose[0] < mouth[1, 0]
        assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()
        assert face.normed_embedding.shape == (512,)
        assert np.isclose(np.linalg.norm(face.normed_embedding), 1.0)
    for i, j in itertools.combinations(range(len(faces)), 2):  # different squares, different embeddings
        assert faces[i].normed_embedding @ faces[j].normed_embedding < 0.6


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_insightface_embedding_follows_the_square_content(face_analysis):
    squares = [(20, 20, 64), (300, 40, 180), (60, 300, 120)]
    image = draw_faces(512, squares, identities=[11, 11, 12])
    faces = sorted(face_analysis.get(np.ascontiguousarray(image[..., ::-1])), key=lambda f: f.bbox[0])
    assert len(faces) == 3
    embeddings = [face.normed_embedding for face in faces]  # by x: identities 11, 12, 11
    assert embeddings[0] @ embeddings[2] > 0.95  # the same content at another size and place
    assert embeddings[0] @ embeddings[1] < 0.6


def test_moa_weights_file_loads_and_fits_the_checkpoint(checkpoint, moa_weights_file):
    model = checkpoint[0]
    weights = load_weights(moa_weights_file)
    check_weights_fit(model, weights, "moa_weights")
    assert weights.config.family == "sd15"
    assert list(weights.config.layers) == layer_specs(model.model.diffusion_model)
    expected = moa_weights_for(model, seed=7, fuser_std=1.0).file_state_dict()  # as the fixture: not "MoA init"
    loaded = weights.file_state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(WeightsMismatchError):  # the check is real: another SD1.5 architecture does not fit
        check_weights_fit(tiny_sd15(), weights, "moa_weights")


def test_sdxl_checkpoint_is_detected_as_sdxl_and_moa_runs_exactly_on_it(sdxl_checkpoint_file, caplog):
    from comfyui_moa.moa_core import FAMILY_BLOCKS, PersonalPrompt, RouterMode, RouterRecord, family_layer_paths
    from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa
    from comfyui_moa.nodes.host.text import bind_subject_words
    from comfyui_moa.nodes.host.unet_layers import model_family
    from moa_testing.tiny import model_patcher

    with caplog.at_level(logging.WARNING):
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sdxl_checkpoint_file))
    assert not missing_key_warnings(caplog)
    assert type(model.model.model_config) is comfy.supported_models.SDXL and model_family(model) == "sdxl"
    assert model.model.model_type.name == "EPS"
    paths = [spec.path for spec in layer_specs(model.model.diffusion_model)]
    assert paths == family_layer_paths("sdxl") and len(paths) == 2 * len(FAMILY_BLOCKS["sdxl"]) == 140

    bound = bind_subject_words(clip, "a photo of a man in a garden", ["man"])
    (positive,), negative = clip.encode_from_tokens_scheduled(bound.tokens), encode(clip, "")
    assert positive[0].shape == (1, bound.prompt_length, 2048) and positive[1]["pooled_output"].shape == (1, 1280)
    embeds = torch.randn(1, 768, generator=torch.Generator().manual_seed(3))
    prompt = PersonalPrompt.single(bound.prompt_length, bound.positions[0], [0] * len(bound.positions[0]), embeds)

    def run(weights, record=None, **options):
        patched = apply_moa(model, model_patcher(weights), prompt, MoAOptions(**options), record)
        return sample(patched, [positive], negative, steps=2, size=128 // 8)

    base = sample(model, [positive], negative, steps=2, size=128 // 8)
    assert torch.equal(run(moa_weights_for(model), router_mode=RouterMode.PERSONAL), base)
    trained = moa_weights_for(model, seed=7)
    assert torch.equal(run(trained, router_mode=RouterMode.PRIOR), base)
    record = RouterRecord(trained.paths)
    assert (run(trained, record) - base).abs().max() > 1e-4
    assert sorted(record.layers()) == list(range(140))  # every layer's router ran
