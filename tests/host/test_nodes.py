"""Tier 2: the nodes, called as ComfyUI calls them, on tiny models built from ComfyUI's classes."""

import folder_paths
import pytest
import torch

from comfyui_moa.moa_core import MoAError, WeightsFormatError, WeightsMismatchError, save_weights
from comfyui_moa.nodes import NODE_CLASS_MAPPINGS as NODES
from comfyui_moa.nodes.host import folders
from comfyui_moa.nodes.host.patch import has_moa
from moa_testing.tiny import moa_weights_for, sample, text_cond, tiny_clip, tiny_clip_vision, tiny_sd15


@pytest.fixture
def moa_folder(tmp_path, monkeypatch):
    """models/moa in a temp folder, as extra_model_paths.yaml would point it."""
    folder = tmp_path / "moa"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, folders.MOA, ([str(folder)], {".safetensors"}))
    return folder


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """ComfyUI's temp folder (where previews and the router viewer's atlases go) in a temp folder."""
    folder = tmp_path / "temp"
    monkeypatch.setattr(folder_paths, "temp_directory", str(folder))
    return folder


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
    return tiny_clip_vision(tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture
def model():
    return tiny_sd15()


def weights_file(folder, model, name="trained.safetensors", seed=7):
    save_weights(moa_weights_for(model, seed=seed), folder / name)
    return name


def photo(seed: int, height: int = 96, width: int = 80, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, height, width, channels, generator=torch.Generator().manual_seed(seed))


def subjects_of(clip_vision, *seeds):
    subjects = ()
    for seed in seeds:
        subjects, _ = NODES["MoASubject"].encode(photo(seed), clip_vision, "largest face", 0.3, subjects=subjects)
    return subjects


def apply(model, moa, clip, subjects, text="a photo of a man at the beach", words="man", **kw):
    options = {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, **kw}
    return NODES["MoAApply"].apply(model, moa, clip, text, words, subjects, **options)


def test_loaded_weights_applied_to_the_model_change_the_image_and_strength_zero_does_not(
    moa_folder, model, clip, clip_vision
):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    subjects = subjects_of(clip_vision, 1)
    patched, positive, _ = apply(model, moa, clip, subjects)
    negative = text_cond(9)
    base = sample(model, positive, negative)
    assert (sample(patched, positive, negative) - base).abs().max() > 1e-4
    off, positive_off, _ = apply(model, moa, clip, subjects, strength=0.0)
    assert torch.equal(sample(off, positive_off, negative), base)
    assert torch.equal(positive[0][0], positive_off[0][0])  # the prompt's encoding is the plain CLIP encoding


def test_each_subject_is_bound_to_its_word(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    subjects = subjects_of(clip_vision, 1, 2)
    patched, _, _ = apply(model, moa, clip, subjects, text="a woman hugs a man", words="man, woman")
    runtime = patched.model_options["transformer_options"]["patches"]["attn2_output_patch"][0].runtime
    prompt = runtime.prompt  # <start> a woman hugs a man: woman at 2, man at 5
    assert prompt.positions.tolist() == [[5, 2]] and prompt.subjects.tolist() == [[0, 1]]
    assert torch.equal(prompt.image_embeds[0, 0], subjects[0].embedding)
    assert torch.equal(prompt.image_embeds[0, 1], subjects[1].embedding)


def test_subject_images_of_any_size_and_channel_count_encode(clip_vision):
    rgba, grey = photo(1, 67, 91, 4), photo(2, 50, 70, 1).expand(3, -1, -1, -1)
    (one,), crops = NODES["MoASubject"].encode(rgba, clip_vision, "largest face", 0.3)
    assert crops.shape == (1, 224, 224, 3) and one.embedding.shape == (768,)
    (batch,), crops = NODES["MoASubject"].encode(grey, clip_vision, "largest face", 0.3)
    assert crops.shape == (3, 224, 224, 3)  # a batch of three reference images is one subject
    same = clip_vision.encode_image(crops, crop=True)["image_embeds"].mean(0)
    torch.testing.assert_close(batch.embedding, same.float(), atol=1e-6, rtol=0)


def test_a_mask_cuts_the_subject_out_as_training_does(clip_vision):
    image, mask = photo(1), torch.zeros(96, 80)
    mask[10:70, 30:50] = 1.0  # 60 high, 20 wide
    (plain,), _ = NODES["MoASubject"].encode(image, clip_vision, "largest face", 0.3)
    (masked,), crops = NODES["MoASubject"].encode(image, clip_vision, "largest face", 0.3, mask=mask)
    assert not torch.allclose(plain.embedding, masked.embedding)
    # padded square: black bars of a third of the width on either side, the subject between
    assert crops.shape == (1, 224, 224, 3)
    assert crops[0, :, :70].max() < 0.02 and crops[0, :, -70:].max() < 0.02
    assert 0.4 < float(crops[0, :, 80:144].mean()) < 0.6  # the random photo, not black
    with pytest.raises(MoAError, match="MoASubject.mask: the mask is empty"):
        NODES["MoASubject"].encode(image, clip_vision, "largest face", 0.3, mask=torch.zeros(96, 80))
    with pytest.raises(MoAError, match="MoASubject.mask: 2 masks for 3 images"):
        NODES["MoASubject"].encode(
            photo(2).expand(3, -1, -1, -1), clip_vision, "largest face", 0.3, mask=torch.ones(2, 96, 80)
        )


def test_subject_blend_moves_linearly_from_a_to_b(clip_vision):
    a, b = subjects_of(clip_vision, 1), subjects_of(clip_vision, 2)
    blend = NODES["MoASubjectBlend"].blend
    assert torch.equal(blend(a, b, 0.0)[0][0].embedding, a[0].embedding)
    assert torch.equal(blend(a, b, 1.0)[0][0].embedding, b[0].embedding)
    torch.testing.assert_close(blend(a, b, 0.5)[0][0].embedding, (a[0].embedding + b[0].embedding) / 2)
    with pytest.raises(MoAError, match="subjects_b: A has 1 subjects and B 2"):
        blend(a, subjects_of(clip_vision, 1, 2), 0.5)


def masks_of(*args, **kwargs):
    """MoARouterMasks' outputs (masks, mask, layer_step_grid), without its ui part."""
    return NODES["MoARouterMasks"].render(*args, **kwargs)["result"]


def test_router_masks_show_the_last_run(moa_folder, temp_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    patched, positive, record = apply(model, moa, clip, subjects_of(clip_vision, 1))
    latent = {"samples": sample(patched, positive, text_cond(9), batch=2)}
    shown = NODES["MoARouterMasks"].render(record, latent, "all", 0.0, 1.0)
    masks, mask, grid = shown["result"]
    (viewer,) = shown["ui"]["moa_router_viewer"]
    assert viewer["pictures"] is None and viewer["size"] == [256, 256]  # no image: the latent's size, heatmap only
    assert masks.shape == (2, 256, 256, 3) and mask.shape == (2, 256, 256) and grid.shape[0] == 1
    assert mask.std() > 1e-4 and 0 <= mask.min() and mask.max() <= 1
    assert grid.shape[1:] == (8 * 66 - 2, 3 * 66 - 2, 3)  # 8 layers x 3 steps of 64 px tiles, 2 px gaps
    image = torch.rand(2, 256, 256, 3)
    over, _, _ = masks_of(record, latent, "cross-attention", 0.0, 1.0, image=image)
    assert over.shape == image.shape and not torch.equal(over, image)
    zero, _, _ = masks_of(record, latent, "up", 0.5, 1.0)
    assert not torch.equal(zero, masks)


def test_router_masks_hand_the_viewer_every_steps_maps_of_every_layer_group(
    moa_folder, temp_folder, model, clip, clip_vision
):
    import json

    import numpy as np
    from PIL import Image

    from comfyui_moa.moa_core.render import colormap_stops
    from comfyui_moa.moa_core.unet_layout import LAYER_GROUPS, layers_in_group

    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    patched, positive, record = apply(model, moa, clip, subjects_of(clip_vision, 1))
    latent = {"samples": sample(patched, positive, text_cond(9), batch=2)}  # 3 steps, 32 x 32 latent
    image = torch.rand(2, 256, 256, 3)
    (shown,) = NODES["MoARouterMasks"].render(record, latent, "cross-attention", 0.0, 1.0, image=image)["ui"][
        "moa_router_viewer"
    ]
    assert json.loads(json.dumps(shown)) == shown  # travels to the browser as JSON
    assert (shown["steps"], shown["batch"], shown["tile"], shown["size"]) == (3, 2, [32, 32], [256, 256])
    assert shown["group"] == "cross-attention" and shown["acted"] == [True] * 3
    assert shown["sigmas"] == list(record.sigmas) and shown["colormap"] == colormap_stops()
    groups = [g for g in LAYER_GROUPS if layers_in_group(record.layer_paths, g)]
    assert list(shown["groups"]) == groups

    def read(file):
        assert file["type"] == "temp"
        return torch.from_numpy(np.array(Image.open(temp_folder / file["subfolder"] / file["filename"])))

    columns, (th, tw) = shown["columns"], shown["tile"]
    for group in groups:
        atlas = read(shown["groups"][group])
        assert atlas.ndim == 2 and atlas.shape[1] == columns * tw  # grayscale
        layers = layers_in_group(record.layer_paths, group)
        for k in range(2 * 3):
            (row, column), (picture, step) = divmod(k, columns), divmod(k, 3)
            tile = atlas[row * th : (row + 1) * th, column * tw : (column + 1) * tw].float() / 255
            expected = record.stack((th, tw), layers, [step], batch=2)[0, :, picture].mean(0)
            torch.testing.assert_close(tile, expected, rtol=0, atol=0.5 / 255 + 1e-6)  # 8-bit rounding
    assert read(shown["groups"]["all"]).unique().numel() > 1  # not one flat grey: the maps were drawn
    pictures = read(shown["pictures"])
    assert shown["pictures"]["count"] == 2 and pictures.shape == (256, 2 * 256, 3)
    assert torch.equal(pictures[:, 256:], (image[1] * 255).round().to(torch.uint8))


def test_init_weights_writes_a_file_the_loader_reads_and_that_leaves_the_model_as_it_is(
    moa_folder, model, clip, clip_vision
):
    result = NODES["MoAInitWeights"].write(model, "fresh", 0, True, True)
    assert (moa_folder / "fresh.safetensors").is_file()
    (moa,) = NODES["MoALoader"].load("fresh.safetensors")
    patched, positive, _ = apply(model, moa, clip, subjects_of(clip_vision, 1), router="personal everywhere")
    negative = text_cond(9)
    assert torch.equal(sample(patched, positive, negative), sample(model, positive, negative))
    assert result["ui"]["text"] == [str(moa_folder / "fresh.safetensors")]
    with pytest.raises(MoAError, match="exists; choose another name"):
        NODES["MoAInitWeights"].write(model, "fresh", 0, True, True)


# Bad input: a clear error naming the node input and the fix, and nothing half-applied.


def test_a_pickle_file_in_models_moa_is_never_opened(moa_folder):
    (moa_folder / "old.ckpt").write_bytes(b"not even read")
    folder_paths.folder_names_and_paths[folders.MOA] = ([str(moa_folder)], set())  # as if listed
    with pytest.raises(WeightsFormatError, match="never opened because they may hold pickled code"):
        NODES["MoALoader"].load("old.ckpt")


def test_a_corrupt_or_foreign_weights_file_is_refused(moa_folder, model):
    (moa_folder / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsFormatError, match="not a readable safetensors file"):
        NODES["MoALoader"].load("broken.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(moa_folder / "a_lora.safetensors"))
    with pytest.raises(WeightsFormatError, match="not an MoA weights file"):
        NODES["MoALoader"].load("a_lora.safetensors")


def test_weights_for_another_model_family_name_the_input(moa_folder, clip, clip_vision):
    from moa_testing.tiny import tiny_sdxl

    sdxl = tiny_sdxl()
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, sdxl, "xl.safetensors"))
    with pytest.raises(WeightsMismatchError, match="MoAApply.moa_weights: the MoA weights are for sdxl models"):
        apply(tiny_sd15(), moa, clip, subjects_of(clip_vision, 1))


def test_subjects_from_another_image_encoder_are_refused(moa_folder, model, clip, tmp_path):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    vit_h = tiny_clip_vision(tmp_path, projection_dim=1024)
    with pytest.raises(WeightsMismatchError, match="with 1024-d embeddings; the MoA weights expect"):
        apply(model, moa, clip, subjects_of(vit_h, 1))
    assert not has_moa(model)


@pytest.mark.parametrize(
    ("text", "words", "seeds", "message"),
    [
        ("a photo of a woman", "man", (1,), "MoAApply.subject_words: 'man' is not in the prompt; add it"),
        ("a man and a woman", "man", (1, 2), r"MoAApply.subject_words: 1 word\(s\) for 2 subject\(s\)"),
        ("a man", "man, woman", (1,), r"2 word\(s\) for 1 subject\(s\)"),
        ("  ", "man", (1,), "MoAApply.text: the prompt is empty"),
    ],
)
def test_prompt_and_word_errors_name_the_input_and_leave_the_model_alone(
    moa_folder, model, clip, clip_vision, text, words, seeds, message
):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    before = dict(model.model_options["transformer_options"])
    with pytest.raises(MoAError, match=message):
        apply(model, moa, clip, subjects_of(clip_vision, *seeds), text=text, words=words)
    assert model.model_options["transformer_options"] == before and not has_moa(model)


def test_two_moa_applies_on_one_model_are_refused(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    patched, _, _ = apply(model, moa, clip, subjects_of(clip_vision, 1))
    with pytest.raises(MoAError, match="MoAApply.model: this model already has MoA applied"):
        apply(patched, moa, clip, subjects_of(clip_vision, 1))


def test_start_after_end_is_refused(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    with pytest.raises(MoAError, match="MoAApply.start_percent: start is after end"):
        apply(model, moa, clip, subjects_of(clip_vision, 1), start_percent=0.8, end_percent=0.2)


def test_images_of_the_wrong_shape_are_refused(clip_vision):
    with pytest.raises(MoAError, match=r"MoASubject.image: expected an IMAGE \[batch, height, width, channels\]"):
        NODES["MoASubject"].encode(torch.rand(1, 64, 64, 2), clip_vision, "largest face", 0.3)


def test_every_face_mode_needs_face_analysis(clip_vision):
    with pytest.raises(MoAError, match="MoASubject.faces: 'every face' needs face_analysis"):
        NODES["MoASubject"].encode(photo(1), clip_vision, "every face, left to right", 0.3)


def test_router_masks_say_why_when_there_is_nothing_to_show(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    _, _, record = apply(model, moa, clip, subjects_of(clip_vision, 1))
    latent = {"samples": torch.zeros(1, 4, 32, 32)}
    with pytest.raises(MoAError, match="no sampler has run with this MoA model; connect MoA Apply's model"):
        NODES["MoARouterMasks"].render(record, latent, "all", 0.0, 1.0)
    _, _, none = apply(model, moa, clip, subjects_of(clip_vision, 1), record_router_maps=False)
    with pytest.raises(MoAError, match="record_router_maps off"):
        NODES["MoARouterMasks"].render(none, latent, "all", 0.0, 1.0)


def test_router_masks_of_a_run_where_moa_did_not_act_show_the_prior_everywhere(
    moa_folder, temp_folder, model, clip, clip_vision
):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    patched, positive, record = apply(model, moa, clip, subjects_of(clip_vision, 1), strength=0.0)
    latent = {"samples": sample(patched, positive, text_cond(9))}
    _, mask, grid = masks_of(record, latent, "all", 0.0, 1.0)
    assert torch.equal(mask, torch.zeros(1, 256, 256))
    assert grid.shape[1:] == (8 * 66 - 2, 3 * 66 - 2, 3)


def test_a_black_region_keeps_the_plain_model_and_a_region_batch_is_refused(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    subjects = subjects_of(clip_vision, 1)
    patched, positive, _ = apply(model, moa, clip, subjects, region=torch.zeros(1, 64, 64))
    negative = text_cond(9)
    assert torch.equal(sample(patched, positive, negative), sample(model, positive, negative))
    left, _, _ = apply(model, moa, clip, subjects, region=torch.ones(1, 64, 64), sparse_threshold=0.0)
    dense, _, _ = apply(model, moa, clip, subjects, sparse_threshold=0.0)
    assert torch.equal(sample(left, positive, negative), sample(dense, positive, negative))
    with pytest.raises(MoAError, match="MoAApply.region: expected one mask"):
        apply(model, moa, clip, subjects, region=torch.zeros(2, 64, 64))
    assert not has_moa(model)


def test_prior_only_uncond_rows_give_an_image_unlike_both_base_and_full_moa(moa_folder, model, clip, clip_vision):
    (moa,) = NODES["MoALoader"].load(weights_file(moa_folder, model))
    subjects = subjects_of(clip_vision, 1)
    negative = text_cond(9)
    full, positive, _ = apply(model, moa, clip, subjects)
    cond_only, _, _ = apply(model, moa, clip, subjects, uncond_rows="prior only")
    outputs = [sample(m, positive, negative) for m in (model, full, cond_only)]
    assert not torch.equal(outputs[2], outputs[0]) and not torch.equal(outputs[2], outputs[1])
