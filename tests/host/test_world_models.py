"""The small world's models in ComfyUI's classes: files round trip, the sampler and the pack see them."""

import pytest
import torch

import moa_pack


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory):
    train = moa_pack.module("moa_world.train")
    folder = tmp_path_factory.mktemp("world")
    train.train_prior(folder, train.PriorRecipe(steps=3, batch=4, warmup=1))
    return folder


def test_load_world_reads_back_the_trained_unet_and_the_text_and_image_encoders(world_folder):
    M = moa_pack.module("moa_world.models")
    from safetensors.torch import load_file

    world = M.load_world(world_folder)
    saved = load_file(world_folder / "unet.safetensors")
    state = world.model.model.diffusion_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.startswith("out."))  # trained, not the zero init
    again = M.load_world(world_folder)
    text = world.clip.encode_from_tokens(world.clip.tokenize("a cat on grass"))
    assert text.shape == (1, 77, 32)
    assert torch.equal(text, again.clip.encode_from_tokens(again.clip.tokenize("a cat on grass")))
    assert not torch.equal(text, world.clip.encode_from_tokens(world.clip.tokenize("a dog on grass")))
    pixels = torch.rand(2, 32, 32, 3)
    embeds = world.vision.encode_image(pixels)["image_embeds"]
    assert embeds.shape == (2, world.vision.model.visual_projection.out_features)
    assert torch.equal(embeds, again.vision.encode_image(pixels)["image_embeds"])


def test_the_pack_sees_an_sd15_model_with_attention_at_16_and_8(world_folder):
    from comfyui_moa.nodes.host.unet_layers import attention_modules, layer_specs, model_family

    world = moa_pack.module("moa_world.models").load_world(world_folder)
    assert model_family(world.model) == "sd15"
    paths = list(attention_modules(world.model.model.diffusion_model))
    assert sum(p.endswith("attn1") for p in paths) == sum(p.endswith("attn2") for p in paths) == 7
    assert {s.context_dim for s in layer_specs(world.model.model.diffusion_model) if s.is_cross} == {32}


def test_the_vae_round_trips_pixels_and_comfys_sampler_fills_an_empty_latent(world_folder):
    import comfy.sample

    M = moa_pack.module("moa_world.models")
    sampling = moa_pack.module("moa_world.sampling")
    world = M.load_world(world_folder)
    pixels = torch.rand(3, 32, 32, 3)
    latent = world.vae.encode(pixels)
    assert latent.shape == (3, 12, 16, 16)
    torch.testing.assert_close(world.vae.decode(latent), pixels, atol=1e-6, rtol=0)  # lossless up to rounding
    empty = torch.zeros(1, 4, 16, 16)  # EmptyLatentImage at 128 x 128
    assert comfy.sample.fix_empty_latent_channels(world.model, empty).shape == (1, 12, 16, 16)
    settings = sampling.SampleSettings(steps=2)
    a = sampling.sample_images(world.model, world.clip, ["a cat on grass", "a dog at night"], [1, 2], settings)
    b = sampling.sample_images(world.model, world.clip, ["a dog at night"], [2], settings)
    assert a.shape == (2, 32, 32, 3) and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # a row depends on its own prompt and seed only


def test_load_world_names_what_is_wrong_with_a_folder(tmp_path, world_folder):
    M = moa_pack.module("moa_world.models")
    with pytest.raises(ValueError, match="no world.json"):
        M.load_world(tmp_path)
    (tmp_path / "world.json").write_text('{"format": "moa-world", "version": 99}')
    with pytest.raises(ValueError, match="v99"):
        M.load_world(tmp_path)


def test_the_world_loader_node_lists_cached_worlds_and_loads_one_as_comfy_types(world_folder, monkeypatch):
    from comfyui_moa.moa_core import MoAError
    from comfyui_moa.nodes import NODE_CLASS_MAPPINGS
    from comfyui_moa.nodes import world as world_node

    monkeypatch.setattr(world_node, "CACHE", world_folder.parent)
    node = NODE_CLASS_MAPPINGS["MoAWorldLoader"]
    choices = node.INPUT_TYPES()["required"]["world"][0]
    assert choices[0] == world_node.SHIPPED and world_folder.name in choices
    model, clip, vae, vision = node.load(world_folder.name)
    assert model.model.model_config.unet_config["in_channels"] == 12
    assert clip.encode_from_tokens(clip.tokenize("a dog")).shape == (1, 77, 32)
    assert vae.decode(vae.encode(torch.zeros(1, 32, 32, 3))).shape == (1, 32, 32, 3)
    assert vision.encode_image(torch.rand(1, 32, 32, 3))["image_embeds"].shape == (1, 64)
    with pytest.raises(MoAError, match="MoAWorldLoader.world"):
        node.load("no such world")
