"""Tiny SD1.5/SDXL-shaped models built from ComfyUI's own classes (no checkpoint needed)."""

from pathlib import Path

import torch

from comfyui_moa.moa_core import MoAWeights, moa_init

TINY_SD15 = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
"""Attention at input 1, middle 0, output 2 and 3: 4 blocks, 8 attention layers."""

TINY_SDXL = {
    **TINY_SD15,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "model_channels": 64,  # SDXL's config fixes 64 channels per head
    "transformer_depth": [1, 2],
    "transformer_depth_output": [1, 1, 2, 2],
    "transformer_depth_middle": 2,
}


def fill_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """ComfyUI builds modules uninitialised: give every parameter seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def model_patcher(model: torch.nn.Module):
    import comfy.model_management as mm
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_sd15(seed: int = 0):
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_SD15))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    fill_(model, seed)
    return model_patcher(model)


def tiny_sdxl(seed: int = 0):
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_SDXL))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    fill_(model, seed)
    return model_patcher(model)


def full_model_on_meta(family: str):
    """The full SD1.5 or SDXL UNet (the benchmark's configs) on the meta device: its layout, no weights."""
    import comfy.supported_models

    from benchmarks.bench_setup import SD15_UNET, SDXL_UNET

    cls, unet = {"sd15": (comfy.supported_models.SD15, SD15_UNET), "sdxl": (comfy.supported_models.SDXL, SDXL_UNET)}[
        family
    ]
    config = cls(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    return model_patcher(config.get_model({}, device="meta"))


def tiny_controlnet(model, seed: int = 1):
    """A ControlNet in ComfyUI's classes with the tiny UNet's architecture, as the loader builds it."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm

    config = {k: v for k, v in model.model.model_config.unet_config.items() if k != "out_channels"}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, **{**config, "dtype": torch.float32})
    fill_(control, seed, std=0.2)
    return comfy.controlnet.ControlNet(control, load_device=mm.get_torch_device())


def moa_weights_for(model, seed: int | None = None, fuser_std: float = 0.05, **init) -> MoAWeights:
    """ "MoA init" for `model`; with a seed, every trainable part gets random values, as if trained
    (a larger `fuser_std` makes subjects whose image embeddings differ little tell apart)."""
    from comfyui_moa.nodes.host.unet_layers import layer_specs, model_family

    weights = moa_init(model_family(model), layer_specs(model.model.diffusion_model), **init)
    if seed is not None:
        fill_(weights, seed, std=0.05)
        for i, (spec, layer) in enumerate(zip(weights.config.layers, weights.layers, strict=True)):
            # routers that vary per pixel on tiny activations; the logits grow with the width, so
            # layers wider than 64 channels (tiny SDXL's) get weights shrunk by the width, or sigmoid saturates
            fill_(layer.router, seed + 1 + i, std=min(1.0, 64 / spec.query_dim))
        fill_(weights.fuser, seed + 100, std=fuser_std)
    return weights.eval().requires_grad_(False)


def sample(
    model, positive, negative, steps: int = 3, seed: int = 42, batch: int = 1, size: int = 32, cfg: float = 7.0,
    sampler: str = "euler",
):  # fmt: skip
    """Latent after `steps` steps of `sampler` with CFG: [batch, 4, size, size]."""
    import comfy.sample

    latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, "normal", positive, negative, latent, seed=seed, disable_pbar=True
    )


def text_cond(seed: int, tokens: int = 77, dim: int = 768, **extra):
    """A CONDITIONING of one random text embedding [1, tokens, dim]."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=generator), dict(extra)]]


FAMILIES = ("sd15", "sdxl")


def tiny_model(family: str, seed: int = 0):
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[family](seed)


def family_cond(family: str, seed: int, tokens: int = 77):
    """A CONDITIONING as the family's text encoders give it: SDXL's is 2048-d with a pooled output."""
    if family == "sd15":
        return text_cond(seed, tokens)
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed + 1000))
    return text_cond(seed, tokens, dim=2048, pooled_output=pooled)


TINY_CLIP_TEXT = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}


def tiny_clip(seed: int = 0):
    """ComfyUI's SD1 CLIP wrapper and real tokenizer around a 2-layer text model: a comfy.sd.CLIP."""
    import comfy.sd
    import comfy.sd1_clip
    from comfy.supported_models_base import ClipTarget

    class TinyClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
            def text_model(**kw):
                return comfy.sd1_clip.SDClipModel(textmodel_json_config=dict(TINY_CLIP_TEXT), **kw)

            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=text_model, **kwargs)

    clip = comfy.sd.CLIP(ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClipModel), parameters=0)
    fill_(clip.cond_stage_model, seed)
    return clip


def tiny_sdxl_clip(seed: int = 0, embedding_directory: str | None = None):
    """SDXL's two text encoders in ComfyUI's classes with 3 layers each (CLIP-L 768-d, OpenCLIP-bigG 1280-d),
    its real tokenizers: a comfy.sd.CLIP whose context is 2048-d, with a pooled output."""
    import comfy.sd
    import comfy.sdxl_clip
    from comfy.supported_models_base import ClipTarget

    small = {"num_hidden_layers": 3, "intermediate_size": 64}  # SDXL reads the penultimate layer
    options = {"clip_l_model_config": small, "clip_g_model_config": small}
    target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory, parameters=0, model_options=options)
    fill_(clip.cond_stage_model, seed)
    return clip


def tiny_clip_vision(folder, projection_dim: int = 768, seed: int = 0):
    """A 2-layer CLIP vision model in ComfyUI's class (config written to `folder`): a ClipVisionModel."""
    import json

    import comfy.clip_vision

    config = {
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "image_size": 224,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 4,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 32,
        "projection_dim": projection_dim,
    }
    path = Path(folder) / f"tiny_clip_vision_{projection_dim}.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    fill_(clip_vision.model, seed, std=0.1)
    return clip_vision


TINY_VAE = {
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,  # ComfyUI's GroupNorm takes 32 groups
        "ch_mult": [1, 1, 1, 1],  # four levels: SD's 8x downscale
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "embed_dim": 4,
}


def tiny_vae(seed: int = 0):
    """ComfyUI's VAE around a 32-channel AutoencoderKL (SD1.5's VAE class, 0.4 M params).

    Random weights would scramble the picture, so the encoder is set by hand to what a trained one
    keeps at 1/8 scale: each 8x8 block's colour. Its resnet and attention blocks are identities,
    its downsamplers box filters; the output norm standardises the R, G, B channels (and their
    negatives) over the image, and the latent holds swish(R), swish(G), swish(B) and
    sum(swish(c) + swish(-c)) ~ how far the block's colour is from the picture's mean, rescaled
    to the unit spread the UNet sees with SD1.5's real VAE. The decoder is random (previews only).
    """
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    autoencoder = AutoencoderKL(**TINY_VAE)
    fill_(autoencoder, seed, std=0.05)
    encoder = autoencoder.encoder
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif ".conv2." in name or ".proj_out." in name:  # residual branches off: blocks are identities
                p.zero_()
        for level in encoder.down:
            if hasattr(level, "downsample"):
                level.downsample.conv.weight.zero_()
                level.downsample.conv.bias.zero_()
                for c in range(32):
                    level.downsample.conv.weight[c, c] = 1.0 / 9
        encoder.conv_in.weight.zero_()
        encoder.conv_in.bias.zero_()
        encoder.conv_out.weight.zero_()
        encoder.conv_out.bias.zero_()
        for c in range(3):
            encoder.conv_in.weight[c, c, 1, 1] = 1.0
            encoder.conv_in.weight[3 + c, c, 1, 1] = -1.0
            encoder.conv_out.weight[c, c, 1, 1] = 1.0
            encoder.conv_out.weight[3, c, 1, 1] = encoder.conv_out.weight[3, 3 + c, 1, 1] = 1.0
        autoencoder.quant_conv.weight.zero_()
        autoencoder.quant_conv.bias.zero_()
        for c in range(8):
            autoencoder.quant_conv.weight[c, c] = 1.0
        probe = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        latent = autoencoder.encode(probe)
        mean, std = latent.mean((0, 2, 3)), latent.std((0, 2, 3)) * 0.18215  # SD1.5's latent scale undone
        autoencoder.quant_conv.weight[:4, :4, 0, 0] = torch.diag(1.0 / std)
        autoencoder.quant_conv.bias[:4] = -mean / std
    return comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": TINY_VAE})
