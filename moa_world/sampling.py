"""Sampling the world's prior through ComfyUI's sampler (comfy.sample.sample), as KSampler does.

Call `moa_pack.use_host(cpu=...)` before importing this module.

`sample_images(model, clip, prompts, seeds, settings) -> images [b, 32, 32, 3] in [0, 1]`: row i
is prompt i from the noise of seed i (the noise KSampler draws for a one-image batch of that
seed), the negative the empty prompt. `model` may be any patched clone (MoA's Apply output), so
prior and MoA samples at the same seeds compare pixel for pixel.
"""

from dataclasses import dataclass
from typing import Any

import comfy.sample
import torch

from .models import LATENT_CHANNELS, WorldVAE


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    cfg: float = 4.0
    sampler: str = "dpmpp_2m"
    scheduler: str = "karras"
    batch: int = 16  # rows per sampler call


def encode_prompts(clip: Any, prompts: list[str]) -> torch.Tensor:
    """Text embeddings [b, 77, d]."""
    return torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])


def seed_noise(seeds: list[int], size: int = 16) -> torch.Tensor:
    """[b, 12, size, size]: row i is what comfy.sample.prepare_noise draws for seed i."""
    return torch.cat([torch.randn(1, LATENT_CHANNELS, size, size, generator=torch.manual_seed(s)) for s in seeds])


def sample_latents(
    model: Any, positive: torch.Tensor, negative: torch.Tensor, seeds: list[int], settings: SampleSettings
) -> torch.Tensor:
    """Latents [b, 12, 16, 16] from text embeddings positive [b, 77, d], negative [1, 77, d]."""
    out = []
    for i in range(0, len(seeds), settings.batch):
        rows = seeds[i : i + settings.batch]
        noise = seed_noise(rows)
        latent = torch.zeros_like(noise)
        cond = [[positive[i : i + len(rows)], {}]]
        uncond = [[negative.expand(len(rows), -1, -1), {}]]
        out.append(
            comfy.sample.sample(
                model,
                noise,
                settings.steps,
                settings.cfg,
                settings.sampler,
                settings.scheduler,
                cond,
                uncond,
                latent,
                seed=rows[0],
                disable_pbar=True,
            )
        )
    return torch.cat(out)


def sample_images(
    model: Any, clip: Any, prompts: list[str], seeds: list[int], settings: SampleSettings | None = None
) -> torch.Tensor:
    """Images [b, 32, 32, 3] in [0, 1] of `prompts` at `seeds`."""
    settings = settings or SampleSettings()
    positive, negative = encode_prompts(clip, prompts), encode_prompts(clip, [""])
    with torch.no_grad():
        return WorldVAE().decode(sample_latents(model, positive, negative, seeds, settings))
