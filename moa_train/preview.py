"""Preview PNGs while training: an image sampled with the current weights through ComfyUI's own
sampler, as the nodes will sample it, beside the router masks it was drawn with.

Left to right: the subject crops, the sample, the sample under its mean router mask, and the
layers x timesteps grid of router maps (moa_core.render; dark: prior, bright: personal).
"""

from pathlib import Path
from typing import Any

import comfy.sample
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from comfyui_moa.moa_core import MoAWeights, PersonalPrompt, RouterRecord
from comfyui_moa.moa_core.render import grid, overlay
from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa

from .models import Models
from .samples import Binder, Example
from .step import encode_subjects

GRID_STEPS = 5  # timesteps shown in the grid


@torch.no_grad()
def sample_with_router_record(
    models: Models, weights_patcher: Any, example: Example, binder: Binder, tail: nn.ModuleList, options: dict
) -> tuple[torch.Tensor, RouterRecord]:
    """Sample `example`'s caption and subjects: IMAGE [1, H, W, 3] and the run's router record.
    `options`: steps, cfg, seed."""
    weights: MoAWeights = weights_patcher.model
    embeds = torch.zeros(len(example.masks), weights.config.image_encoder.dim)
    if example.crops.shape[0]:
        encoded = encode_subjects(models.vision, example.crops, tail).float().cpu()
        embeds[list(example.conditioned)] = encoded
    slots = [(p, s) for s, ps in zip(example.conditioned, example.binding.positions, strict=True) for p in ps]
    prompt = PersonalPrompt.single(example.binding.length, [p for p, _ in slots], [s for _, s in slots], embeds)
    positive = models.clip.encode_from_tokens_scheduled(example.binding.tokens, show_pbar=False)
    negative = models.clip.encode_from_tokens_scheduled(binder("", [], []).tokens, show_pbar=False)
    record = RouterRecord(weights.paths)
    patched = apply_moa(models.model, weights_patcher, prompt, MoAOptions(), record)
    ratio = models.vae.downscale_ratio
    channels = models.model.model.latent_format.latent_channels
    latent = torch.zeros(1, channels, example.image.shape[-2] // ratio, example.image.shape[-1] // ratio)
    noise = comfy.sample.prepare_noise(latent, options["seed"])
    samples = comfy.sample.sample(
        patched, noise, options["steps"], options["cfg"], "euler", "normal", positive, negative, latent,
        seed=options["seed"], disable_pbar=True,
    )  # fmt: skip
    return models.vae.decode(samples).float().cpu().clamp(0, 1), record


def preview_image(image: torch.Tensor, record: RouterRecord, crops: torch.Tensor) -> np.ndarray:
    """IMAGE [1, H, W, 3], its router record and subject crops [c, 3, S, S] -> one RGB uint8 picture."""
    height = image.shape[1]
    steps = max(1, len(record.sigmas) - 1)  # the run's sampling steps
    shown = sorted({round(i * (steps - 1) / max(1, GRID_STEPS - 1)) for i in range(min(GRID_STEPS, steps))})
    layers = list(range(len(record.layer_paths)))
    maps = record.stack(tuple(image.shape[1:3]), layers, shown, 1)  # [T, L, 1, H, W]
    mean_map = maps[:, :, 0].mean((0, 1))[None]
    tiles = grid(maps[:, :, 0].transpose(0, 1), tile=max(16, min(64, height // len(layers))))[0]  # ~ image height
    columns = [image[0], overlay(image, mean_map)[0], tiles]
    if crops.shape[0]:
        side = height // crops.shape[0]
        column = F.interpolate(crops.float(), size=(side, side), mode="bilinear", align_corners=False)
        columns.insert(0, column.permute(0, 2, 3, 1).reshape(-1, side, 3))
    tallest = max(c.shape[0] for c in columns)
    padded = [F.pad(c, (0, 0, 0, 0, 0, tallest - c.shape[0]), value=1.0) for c in columns]
    return (torch.cat(padded, dim=1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_preview(path: Path, picture: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
