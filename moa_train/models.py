"""What a run trains on: the host models (from files, through ComfyUI's own loaders, or handed in),
the MoA weights it starts from, the layers each loss reads, and the facts written with the result."""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.clip_vision
import comfy.model_management as mm
import comfy.model_sampling
import comfy.sd
import torch
from comfy.model_patcher import ModelPatcher

from comfyui_moa.moa_core import FuserConfig, ImageEncoderSpec, MoAWeights, PersonalPrompt, load_weights, moa_init
from comfyui_moa.moa_core.errors import ConfigError
from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa
from comfyui_moa.nodes.host.unet_layers import attention_modules, check_weights_fit, layer_specs, model_family

from .config import TrainConfig
from .step import Frozen, LossPlan, TrainingModel

# FastComposer's localisation layers (down_blocks.1/2, mid_block, up_blocks.1/2) in ComfyUI's SD1.5 paths
FASTCOMPOSER_OBJECT_BLOCKS = {
    "sd15": (
        *(f"input_blocks.{i}.1" for i in (4, 5, 7, 8)),
        "middle_block.1",
        *(f"output_blocks.{i}.1" for i in range(3, 9)),
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Models:
    """The frozen host models. `model_name`/`vision_name` go into the weights' training facts."""

    model: Any  # comfy ModelPatcher of an SD1.5-family (eps or v) model
    clip: Any  # comfy.sd.CLIP
    vae: Any  # comfy.sd.VAE
    vision: Any  # comfy.clip_vision.ClipVisionModel
    model_name: str = "in-process model"
    vision_name: str = "in-process CLIP vision"


def load_models(config: TrainConfig, on_gpu: bool) -> Models:
    """The checkpoint through comfy.sd.load_checkpoint_guess_config and the CLIP vision model
    through comfy.clip_vision.load, as ComfyUI's loader nodes load them; or, with `[model] world`,
    the small world's models through moa_world's load_world (the same ComfyUI classes)."""
    settings = config.model
    if settings.world:
        return load_world_models(settings.world, config)
    for name, path in (("checkpoint", settings.checkpoint), ("clip_vision", settings.clip_vision)):
        if not path or not Path(path).is_file():
            raise ConfigError(f"[model] {name}: {path or 'not set'} is no file; give the path of the model file")
    dtype = settings.unet_dtype
    if dtype == "auto":
        dtype = "bf16" if on_gpu else "fp32"
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        settings.checkpoint, output_vae=True, output_clip=True, model_options={"dtype": DTYPES[dtype]}
    )
    if model is None or clip is None or vae is None:
        raise ConfigError(f"[model] checkpoint: {settings.checkpoint} lacks a UNet, text encoder or VAE")
    vision = comfy.clip_vision.load(settings.clip_vision)
    if vision is None:
        raise ConfigError(
            f"[model] clip_vision: ComfyUI does not recognise {settings.clip_vision} as a CLIP vision model; "
            "use the CLIP ViT-L/14 vision file (models/clip_vision)"
        )
    return Models(model, clip, vae, vision, Path(settings.checkpoint).name, Path(settings.clip_vision).name)


def load_world_models(folder: str, config: TrainConfig) -> Models:
    """The small world's prior, text encoder, VAE and subject encoder (moa_world.models.load_world)."""
    if config.model.checkpoint or config.model.clip_vision:
        raise ConfigError("[model] world: give the world folder or checkpoint + clip_vision files, not both")
    from comfyui_moa.moa_world.models import load_world

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"[model] world: {folder} is no folder; build one with python -m moa_world build")
    world = load_world(path)
    name = f"world:{path.name}"
    return Models(world.model, world.clip, world.vae, world.vision, name, f"{name}/subject encoder")


def check_resolution(config: TrainConfig, models: Models) -> None:
    """[data] resolution must give a latent the UNet can halve at each of its levels."""
    levels = len(models.model.model.model_config.unet_config.get("channel_mult", (1,)))
    multiple = int(getattr(models.vae, "downscale_ratio", 8)) * 2 ** (levels - 1)
    if config.data.resolution % multiple:
        raise ConfigError(
            f"[data] resolution: {config.data.resolution} px is no multiple of {multiple}, which this model's "
            f"VAE and {levels} UNet levels need"
        )


def build_weights(config: TrainConfig, models: Models) -> MoAWeights:
    """MoA init for the model's attention layers, or the weights file `[moa] init`, ready to train."""
    image_dim = models.vision.model.visual_projection.out_features
    if config.moa.init:
        weights = load_weights(config.moa.init)
        check_weights_fit(models.model, weights, "[moa] init")
        if weights.config.image_encoder.dim != image_dim:
            raise ConfigError(f"[moa] init: its fuser takes {weights.config.image_encoder.dim}-d image embeddings, "
                              f"the CLIP vision model gives {image_dim}")  # fmt: skip
        return weights.float().train().requires_grad_(True)
    family = model_family(models.model)
    if family is None:
        raise ConfigError("[model] checkpoint: MoA trains on SD1.5 and SDXL models; this is neither")
    specs = layer_specs(models.model.model.diffusion_model)
    text_dim = next(spec.context_dim for spec in specs if spec.is_cross)
    m = config.moa
    fuser = FuserConfig(
        text_dim=text_dim,
        image_dim=image_dim,
        hidden_dim=m.fuser_hidden_dim or text_dim,
        timestep_conditioning=m.timestep_conditioning,
        layer_conditioning=m.layer_conditioning,
        cond_dim=m.fuser_cond_dim,
    )
    encoder = ImageEncoderSpec(name=config.model.image_encoder, output="image_embeds", dim=image_dim)
    torch.manual_seed(config.run.seed)  # the routers' and fuser's random first layers
    weights = moa_init(family, specs, fuser, encoder, m.delta_rank, m.router_hidden_ratio, m.prior_init)
    return weights.train().requires_grad_(True)


def training_model(
    config: TrainConfig, models: Models, weights: MoAWeights, device: torch.device
) -> tuple[TrainingModel, ModelPatcher]:
    """The module a step runs: the host frozen, `weights` (and the chosen CLIP-vision layers)
    trainable, the model patched by the nodes' apply_moa. Also returns the weights' ModelPatcher."""
    check_resolution(config, models)
    # the step's loss is in eps, (x_t - denoised) / sigma, which holds wherever x_t = x0 + sigma * eps and
    # the UNet sees x_t / sqrt(sigma^2 + 1): EPS and V_PREDICTION (SD1.5, SD2-v, the small world), not flow models
    sampling = type(models.model.get_model_object("model_sampling"))
    eps = comfy.model_sampling.EPS
    if sampling.noise_scaling is not eps.noise_scaling or sampling.calculate_input is not eps.calculate_input:
        raise ConfigError("[model] checkpoint: MoA trains on eps- or v-predicting models (SD1.5), not flow models")
    for module in (models.model.model, models.clip.cond_stage_model, models.vae.first_stage_model, models.vision.model):
        module.requires_grad_(False)
    weights = weights.to(device)
    tail = config.optim.vision_layers
    layers = models.vision.model.vision_model.encoder.layers
    if tail > len(layers) or (tail and models.vision.model.vision_model.output_layernorm):
        raise ConfigError(f"[optim] vision_layers: {tail} must be at most the {len(layers)} layers of a CLIP ViT")
    for layer in list(layers)[len(layers) - tail :]:
        layer.float().requires_grad_(True)
    # offload device = load device: ComfyUI's memory management never moves trainable weights away
    weights_patcher = ModelPatcher(weights, load_device=device, offload_device=device)
    no_subjects = PersonalPrompt.single(77, [], [], torch.zeros(1, weights.config.image_encoder.dim))
    # each batch brings its prompt; the weights change, so zero deltas are no shortcut
    patched = apply_moa(models.model, weights_patcher, no_subjects, MoAOptions(), weights_fixed=False)
    mm.load_models_gpu([patched, weights_patcher, models.vision.patcher], force_full_load=True)
    frozen = Frozen(patched, models.clip, models.vae, models.vision)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return TrainingModel(weights, tail, frozen, loss_plan(config, weights), autocast), weights_patcher


def loss_plan(config: TrainConfig, weights: MoAWeights) -> LossPlan:
    paths = weights.paths
    cross = weights.config.cross_layers
    router = _select(config.loss.router_layers, paths, list(range(len(paths))), "router_layers")
    names = config.loss.object_layers
    if names == ("fastcomposer",):
        blocks = FASTCOMPOSER_OBJECT_BLOCKS.get(weights.config.family, ())
        wanted = [f"{block}.transformer_blocks.0.attn2" for block in blocks]
        if not wanted or any(path not in paths for path in wanted):
            raise ConfigError(
                '[loss] object_layers = ["fastcomposer"] names the middle cross-attention layers of a full SD1.5 '
                'UNet, which this model lacks; list its attn2 layer paths or use ["all"]'
            )
        names = tuple(wanted)
    objects = _select(names, paths, cross, "object_layers")
    if any(i not in cross for i in objects):
        raise ConfigError("[loss] object_layers: the object loss reads cross-attention (attn2) layers only")
    loss = config.loss
    return LossPlan(
        router, objects, loss.router_weight, loss.object_weight, loss.router_subject_weight, loss.weighting == "v"
    )


def _select(names: tuple[str, ...], paths: list[str], everything: list[int], setting: str) -> tuple[int, ...]:
    if names == ("all",):
        return tuple(everything)
    unknown = [name for name in names if name not in paths]
    if unknown:
        raise ConfigError(f"[loss] {setting}: {unknown[0]!r} is not an attention layer of this model ({paths[0]}, ...)")
    return tuple(paths.index(name) for name in names)


def base_fingerprint(model: Any) -> str:
    """A hash of a few of the base model's attention weights: which model the weights were trained on."""
    modules = attention_modules(model.model.diffusion_model)
    digest = hashlib.sha256()
    for path in (next(iter(modules)), next(reversed(modules))):
        for projection in (modules[path].to_q, modules[path].to_k):
            digest.update(projection.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def training_facts(config: TrainConfig, models: Models, steps: int, global_batch: int, skipped: int) -> dict:
    """What the weights file records about its training (MoAConfig.training)."""
    optim, loss, data = config.optim, config.loss, config.data
    return {
        "trainer": "moa_train",
        "base_model": models.model_name,
        "base_fingerprint": base_fingerprint(models.model),
        "world": config.model.world or None,  # the small world's folder when it is the base model
        "image_encoder_file": models.vision_name,
        "steps": steps,
        "global_batch": global_batch,
        "data_root": str(data.root),
        "data_layout": data.layout,
        "resolution": data.resolution,
        "samples_skipped": skipped,
        "seed": config.run.seed,
        "lr": {
            "deltas": optim.lr_deltas,
            "routers": optim.lr_routers,
            "fuser": optim.lr_fuser,
            "vision": optim.lr_vision,
        },
        "vision_layers_trained": optim.vision_layers,
        "loss": {
            "router_weight": loss.router_weight,
            "router_subject_weight": loss.router_subject_weight,
            "object_weight": loss.object_weight,
            "router_layers": list(loss.router_layers),
            "object_layers": list(loss.object_layers),
        },
        "dropout": {"uncondition_prob": data.uncondition_prob, "subject_keep_prob": data.subject_keep_prob},
    }
