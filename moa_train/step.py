"""One training step: a batch through the ComfyUI-loaded model with the nodes' own MoA patch.

The model is called the way ComfyUI's sampler calls it (`apply_model` with the transformer options
the sampler would build), with the batch's multimodal prompt and a training probe in them; the
patch fills the probe with every layer's router weights and the personal expert's attention to
the subject tokens, and the losses (moa_core.losses) are read from there.
"""

from dataclasses import dataclass
from typing import Any

import comfy.clip_vision
import comfy.model_management as mm
import torch
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.patcher_extension import merge_nested_dicts
from torch import nn

from comfyui_moa.moa_core import (
    MoAWeights,
    PersonalPrompt,
    TrainingProbe,
    masked_diffusion_loss,
    object_loss,
    prior_map,
    router_loss,
    router_subject_loss,
    v_weights,
)
from comfyui_moa.moa_core.losses import masked_mean, resize_mask
from comfyui_moa.nodes.host.patch import PROBE_KEY, PROMPT_KEY

from .samples import Batch


@dataclass(frozen=True)
class Frozen:
    """The host models a step runs through and never trains."""

    model: Any  # ModelPatcher: the base model with MoA applied (apply_moa)
    clip: Any  # comfy.sd.CLIP
    vae: Any  # comfy.sd.VAE
    vision: Any  # comfy.clip_vision.ClipVisionModel


@dataclass(frozen=True)
class LossPlan:
    router_layers: tuple[int, ...]  # MoA layer indices whose routers the router loss reads
    object_layers: tuple[int, ...]  # cross-attention layer indices the object loss reads
    router_weight: float
    object_weight: float
    router_subject_weight: float
    v_weighting: bool = False  # the diffusion loss weighted as the v error (losses.v_weights)


def training_options(model: Any, prompt: PersonalPrompt, probe: TrainingProbe, sigma: torch.Tensor) -> dict:
    """transformer_options for one model call, built as ComfyUI's sampler builds them (the model's
    transformer options, its wrappers and callbacks merged in, the chunk layout and sigmas), plus
    the batch's prompt and probe. Every row is a cond row."""
    options = dict(model.model_options.get("transformer_options", {}))
    options["wrappers"] = merge_nested_dicts(options.get("wrappers", {}), model.wrappers)
    options["callbacks"] = merge_nested_dicts(options.get("callbacks", {}), model.callbacks)
    options.update({"cond_or_uncond": [0], "sigmas": sigma, PROMPT_KEY: prompt, PROBE_KEY: probe})
    return options


def sample_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-sample Gaussian noise [b, *shape], each row from its own seed (drawn on the CPU, so
    the same on every device and in every batch split)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def encode_captions(clip: Any, tokens: tuple, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-window captions -> (text embeddings [b, t, d], pooled outputs [b, p] or None) in one
    text-encoder call: the batch's windows laid end to end as one long prompt, which ComfyUI encodes
    window by window. ComfyUI pools a long prompt's first window only, so with `pooled` (SDXL, whose
    UNet reads the pooled output) each caption is encoded on its own."""
    if pooled:
        encoded = [clip.encode_from_tokens(sample, return_pooled=True) for sample in tokens]
        return torch.cat([c for c, _ in encoded]), torch.cat([p for _, p in encoded])
    joined = {key: [window for sample in tokens for window in sample[key]] for key in tokens[0]}
    encoded = clip.encode_from_tokens(joined)
    return encoded.reshape(len(tokens), -1, encoded.shape[-1]), None


def size_conditioning(model: Any, pooled: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """The UNet's `y` for models that take one (SDXL: the pooled text and the image size, uncropped, as
    ComfyUI's CLIPTextEncode gives it), else None."""
    if pooled is None:
        return None
    return model.encode_adm(pooled_output=pooled, width=width, height=height)


def encode_subjects(vision: Any, crops: torch.Tensor, tail: nn.ModuleList) -> torch.Tensor:
    """Subject crops [c, 3, S, S] in [0, 1] -> CLIP image embeddings [c, e], through ComfyUI's
    CLIP vision model; with gradients into the `tail` layers when they train."""
    images = crops.movedim(1, -1)
    if not len(tail):
        with torch.no_grad():
            return vision.encode_image(images, crop=True)["image_embeds"]
    mm.load_model_gpu(vision.patcher)
    device = vision.load_device
    pixels = comfy.clip_vision.clip_preprocess(
        images.to(device), size=vision.image_size, mean=vision.image_mean, std=vision.image_std, crop=True
    ).float()
    model = vision.model.vision_model
    attention = optimized_attention_for_device(pixels.device, mask=False, small_input=True)
    layers = list(model.encoder.layers)
    with torch.no_grad():
        x = model.pre_layrnorm(model.embeddings(pixels))
        for layer in layers[: len(layers) - len(tail)]:
            x = layer(x, None, attention)
    for layer in tail:
        # ComfyUI's CLIPLayer adds in place, which autograd refuses once the layer's weights train
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return vision.model.visual_projection(model.post_layernorm(x[:, 0]))


class TrainingModel(nn.Module):
    """Owns what trains (MoA weights, optionally the last CLIP-vision layers); its forward is one
    step's losses. This is the module DistributedDataParallel wraps."""

    def __init__(
        self, weights: MoAWeights, vision_tail: int, frozen: Frozen, plan: LossPlan, autocast: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.weights = weights
        layers = list(frozen.vision.model.vision_model.encoder.layers) if vision_tail else []
        self.vision_layers = nn.ModuleList(layers[len(layers) - vision_tail :])
        self.frozen, self.plan, self.autocast = frozen, plan, autocast

    @property
    def device(self) -> torch.device:
        return next(self.weights.parameters()).device

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's losses and router metrics (scalars)."""
        device = self.device
        batch = batch.to(device)
        frozen = self.frozen
        with torch.no_grad():
            x0 = frozen.model.model.process_latent_in(frozen.vae.encode(batch.images.movedim(1, -1))).to(device)
            base = frozen.model.model
            context, pooled = encode_captions(frozen.clip, batch.tokens, pooled=base.adm_channels > 0)
            height, width = batch.images.shape[-2:]
            y = size_conditioning(base, pooled, height, width)
            context, y = context.to(device), None if y is None else y.to(device)
        sampling = frozen.model.get_model_object("model_sampling")
        timestep = (batch.timesteps * len(sampling.sigmas)).floor().clamp(max=len(sampling.sigmas) - 1)
        sigma = sampling.sigma(timestep).to(device)
        noise = sample_noise(batch.noise_seeds, tuple(x0.shape[1:])).to(device)
        noisy = sampling.noise_scaling(sigma, noise, x0)
        prompt = PersonalPrompt(context.shape[1], batch.positions, batch.subjects, self._subject_embeds(batch))
        probe = TrainingProbe(self.plan.object_layers if self.plan.object_weight else ())
        options = training_options(frozen.model, prompt, probe, sigma)
        with torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            denoised = base.apply_model(noisy, sigma, c_crossattn=context, y=y, transformer_options=options)
        prediction = (noisy - denoised.float()) / sigma.view(-1, 1, 1, 1)  # eps, whatever the model predicts
        weights = v_weights(sigma) if self.plan.v_weighting else None
        return self._losses(prediction, noise, batch, probe, weights)

    def _subject_embeds(self, batch: Batch) -> torch.Tensor:
        """[b, s, e]: each conditioned subject's CLIP embedding in its row and slot, zeros elsewhere."""
        embeds = torch.zeros(*batch.masks.shape[:2], self.weights.config.image_encoder.dim, device=self.device)
        if batch.crops.shape[0] == 0:
            return embeds
        encoded = encode_subjects(self.frozen.vision, batch.crops, self.vision_layers).to(embeds)
        return embeds.index_put((batch.crop_rows, batch.crop_subjects), encoded)

    def _losses(self, prediction, noise, batch: Batch, probe: TrainingProbe, sample_weights=None) -> dict:
        plan = self.plan
        union = batch.masks.amax(1)
        masked = masked_diffusion_loss(prediction, noise, union, sample_weights)
        r1 = [probe.router[i] for i in plan.router_layers]
        grids = [probe.grids[i] for i in plan.router_layers]
        router = router_loss(r1, grids, union)
        router_subject = router_subject_loss(r1, grids, union)
        rows = probe.tokens.rows  # every row is a cond row: batch rows are prompt rows
        token_masks = batch.masks[rows, probe.tokens.subjects]
        layers = sorted(probe.attention_layers)
        attention, grids_obj = [probe.attention[i] for i in layers], [probe.grids[i] for i in layers]
        obj = object_loss(attention, grids_obj, token_masks, rows, prediction.shape[0]).to(masked)
        loss = (
            masked
            + plan.router_weight * router
            + plan.router_subject_weight * router_subject
            + plan.object_weight * obj
        )
        with torch.no_grad():
            prior = prior_map(r1, grids)
            subject = resize_mask(union, tuple(prior.shape[-2:]))
            metrics = {
                "prior_background": masked_mean(prior.reshape(1, -1), 1.0 - subject.reshape(1, -1))[0],
                "prior_subject": masked_mean(prior.reshape(1, -1), subject.reshape(1, -1))[0],
            }
        return {
            "loss": loss,
            "masked_diffusion": masked.detach(),
            "router": router.detach(),
            "router_subject": router_subject.detach(),
            "object": obj.detach(),
        } | metrics
