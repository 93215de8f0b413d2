"""The small world's models in ComfyUI's own classes, and their files.

Call `moa_pack.use_host(cpu=...)` before importing this module (it imports comfy).

- UNet: `WorldSD15`, a `comfy.supported_models.SD15` subclass (so the pack's model_family() says
  "sd15"; ComfyUI's discrete schedule, SD1.5's betas, v-prediction) whose latent format has 12
  channels. `UNET_CONFIG`: model_channels 64, channel_mult [1, 1, 2] on the 16x16 latent (levels
  16, 8, 4 at 64, 64, 128 channels; 3.8 M parameters), one res block a level, spatial
  transformers (self + cross attention) at 16x16 and 8x8 down and up (input blocks 1, 2; output
  blocks 2-5) and in the middle (4x4): 7 blocks, 14 attention layers, context_dim 32, heads of 16
  channels.
- Text: ComfyUI's SD1 tokenizer and `comfy.sd1_clip.SD1ClipModel` around a 2-layer CLIP text
  model of hidden size 32 (`CLIP_CONFIG`), random and frozen (embedding N(0, 1), so the final
  layer norm's output carries each word); context [b, 77, 32].
- "VAE": `WorldVAE`, pixels [b, 32, 32, 3] in [0, 1] <-> latent [b, 12, 16, 16] (2x-1, then a
  2x2 pixel unshuffle: lossless). ComfyUI's VAEEncode/VAEDecode nodes and moa_train's
  `vae.encode` use it unchanged; EmptyLatentImage at width = height = 128 gives its 16x16 latent
  (ComfyUI's fix_empty_latent_channels makes an all-zero latent 12 channels).
- Subject encoder: `comfy.clip_vision.ClipVisionModel` of `VISION_CONFIG` (ViT, 32 px, patch 4,
  hidden 64, 2 layers, projection 64); see encoder.py for how it is trained.

Files of a world folder (safetensors, no pickle): `unet.safetensors`, `clip.safetensors`,
`vision.safetensors`, `vision.json` (ComfyUI's ClipVisionModel reads its config from a file),
`world.json` (configs, training facts). `save_world(folder, models, facts)` writes them,
`load_world(folder) -> WorldModels(model, clip, vae, vision)` reads them.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import comfy.clip_vision
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import torch
from comfy.model_patcher import ModelPatcher
from comfy.supported_models_base import ClipTarget
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "moa-world"
VERSION = 3  # 2: the UNet predicts v; 3: 64 channels at the top level (world 2)
LATENT_CHANNELS = 12

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 16,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "model_channels": 64,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 2],
    "transformer_depth": [1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

CLIP_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 32,
    "vocab_size": 49408,
}

VISION_CONFIG = {
    "hidden_act": "gelu",
    "hidden_size": 64,
    "image_size": 32,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 4,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 4,
    "projection_dim": 64,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.25, 0.25, 0.25],
}


class WorldLatent(comfy.latent_formats.LatentFormat):
    """The world's latent: 12 channels (a 2x2 pixel unshuffle of RGB in [-1, 1]), scaled to about
    unit variance (the scenes' std is about 0.66)."""

    latent_channels = LATENT_CHANNELS
    scale_factor = 1.5


class WorldSD15(comfy.supported_models.SD15):
    """SD1.5's model config and schedule with the world's latent format, predicting v (as SD2's
    768-v models do): a 1.5 M-parameter eps model learns nothing about x0 at high noise (its x0
    there is x_t - sigma * eps, every output error times sigma), so it cannot draw from noise."""

    latent_format = WorldLatent
    memory_usage_factor = 0.05
    # heads of 16 channels (SD1.5's 8 heads would be 4 channels each here, and 4x the softmax work)
    unet_extra_config: ClassVar[dict] = {"num_heads": -1, "num_head_channels": 16}

    def model_type(self, state_dict: dict, prefix: str = "") -> Any:
        return comfy.model_base.ModelType.V_PREDICTION

    def inpaint_model(self) -> bool:
        return False  # ComfyUI takes a UNet of more than 4 input channels for an inpainting one


class WorldClipModel(comfy.sd1_clip.SD1ClipModel):
    """SD1's CLIP wrapper around the world's small text model."""

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        def text_model(**kw):
            return comfy.sd1_clip.SDClipModel(textmodel_json_config=dict(CLIP_CONFIG), **kw)

        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=text_model, **kwargs)


class Unshuffle(nn.Module):
    """The VAE's "first stage model": pixels [b, 3, H, W] in [0, 1] <-> latent [b, 12, H/2, W/2]."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_unshuffle(pixels * 2 - 1, 2)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return ((nn.functional.pixel_shuffle(latent, 2) + 1) / 2).clamp(0, 1)


class WorldVAE:
    """ComfyUI VAE's interface for the world's lossless latent: `encode(pixels [b, H, W, 3])` ->
    latent [b, 12, H/2, W/2] (before process_latent_in), `decode(latent)` -> [b, H, W, 3]."""

    downscale_ratio = 2
    upscale_ratio = 2
    latent_channels = LATENT_CHANNELS
    latent_dim = 2
    output_channels = 3

    def __init__(self) -> None:
        self.first_stage_model = Unshuffle()
        self.device = mm.intermediate_device()
        self.output_device = mm.intermediate_device()
        self.vae_dtype = torch.float32
        self.patcher = ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=self.device)

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = (pixels.shape[1] // 2) * 2, (pixels.shape[2] // 2) * 2
        return pixels[:, :h, :w]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.vae_encode_crop_pixels(pixels[..., :3])
        return self.first_stage_model.encode(pixels.movedim(-1, 1).float()).to(self.output_device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(latent.float()).movedim(1, -1).to(self.output_device)

    def encode_tiled(self, pixels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.encode(pixels)

    def decode_tiled(self, latent: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.decode(latent)

    def spacial_compression_encode(self) -> int:
        return 2

    def spacial_compression_decode(self) -> int:
        return 2

    def temporal_compression_decode(self) -> None:
        return None

    def get_sd(self) -> dict:
        return {}


@dataclass(frozen=True)
class WorldModels:
    model: Any  # ModelPatcher of the WorldSD15 UNet
    clip: Any  # comfy.sd.CLIP
    vae: WorldVAE
    vision: Any  # comfy.clip_vision.ClipVisionModel


def _seeded_init(module: nn.Module, seed: int) -> None:
    """ComfyUI builds modules uninitialised: torch's default init for convs and linears, norms
    1/0, and the residual branches' last layers and the output zero (as the original UNet)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, m in module.named_modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                # comfy.ops' layers make reset_parameters a no-op: call torch's own
                (nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d).reset_parameters(m)
                if name.endswith(("out_layers.3", "proj_out", "out.2")):
                    m.weight.zero_()
                    if m.bias is not None:
                        m.bias.zero_()
            elif isinstance(m, nn.GroupNorm | nn.LayerNorm):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()


def build_unet(seed: int) -> ModelPatcher:
    """A freshly initialised world UNet (fp32) in a ModelPatcher."""
    config = WorldSD15(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    _seeded_init(model.diffusion_model, seed)
    return ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _new_clip() -> Any:
    target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, WorldClipModel)
    return comfy.sd.CLIP(target, model_options={"dtype": torch.float32})


def build_clip(seed: int) -> Any:
    """The world's frozen random text encoder: a comfy.sd.CLIP (fp32)."""
    clip = comfy.sd.CLIP(
        ClipTarget(comfy.sd1_clip.SD1Tokenizer, WorldClipModel), model_options={"dtype": torch.float32}
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
            else:
                p.zero_()
    return clip


def build_vision(folder: str | Path, seed: int) -> Any:
    """A freshly initialised subject encoder; its config is written to `folder`/vision.json."""
    path = Path(folder) / "vision.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(VISION_CONFIG, indent=1))
    vision = comfy.clip_vision.ClipVisionModel(str(path))
    vision.model.float()
    vision.dtype = torch.float32
    _seeded_init(vision.model, seed)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embeddings = vision.model.vision_model.embeddings
        embeddings.class_embedding.normal_(0, 0.02)
        embeddings.position_embedding.weight.normal_(0, 0.02)
    return vision


def clip_state(clip: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in clip.cond_stage_model.state_dict().items()}


def save_world(folder: str | Path, models: WorldModels, facts: dict, dtype: torch.dtype = torch.float32) -> None:
    """Write the world folder (see the module docstring); `dtype` of the stored tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def cast(state: dict) -> dict:
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}

    meta = {"format": FORMAT, "version": str(VERSION)}
    save_file(cast(models.model.model.diffusion_model.state_dict()), folder / "unet.safetensors", meta)
    save_file(cast(clip_state(models.clip)), folder / "clip.safetensors", meta)
    save_file(cast(models.vision.model.state_dict()), folder / "vision.safetensors", meta)
    (folder / "vision.json").write_text(json.dumps(VISION_CONFIG, indent=1))
    info = {"format": FORMAT, "version": VERSION, "unet": UNET_CONFIG, "clip": CLIP_CONFIG, "facts": facts}
    (folder / "world.json").write_text(json.dumps(info, indent=1))


def _load_strict(module: nn.Module, state: dict, what: str, folder: Path) -> None:
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: {what} does not fit the world's model (missing {missing[:3]}, extra {unexpected[:3]})"
        )


def load_world(folder: str | Path) -> WorldModels:
    """The world's models from a world folder (fp32), frozen and in eval mode."""
    folder = Path(folder)
    info_file = folder / "world.json"
    if not info_file.is_file():
        raise ValueError(f"{folder}: no world.json; build the world with `python -m moa_world build`")
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ValueError(
            f"{folder}: world.json is {info.get('format')} v{info.get('version')}, not {FORMAT} v{VERSION}"
        )
    model = build_unet(0)
    _load_strict(model.model.diffusion_model, load_file(folder / "unet.safetensors"), "unet.safetensors", folder)
    clip = comfy.sd.CLIP(
        ClipTarget(comfy.sd1_clip.SD1Tokenizer, WorldClipModel), model_options={"dtype": torch.float32}
    )
    clip_sd = load_file(folder / "clip.safetensors")
    clip_sd.pop("clip_l.transformer.text_model.embeddings.position_ids", None)
    _load_strict(clip.cond_stage_model, clip_sd, "clip.safetensors", folder)
    vision = comfy.clip_vision.ClipVisionModel(str(folder / "vision.json"))
    vision.model.float()
    vision.dtype = torch.float32
    _load_strict(vision.model, load_file(folder / "vision.safetensors"), "vision.safetensors", folder)
    for module in (model.model, clip.cond_stage_model, vision.model):
        module.eval().requires_grad_(False)
    return WorldModels(model, clip, WorldVAE(), vision)
