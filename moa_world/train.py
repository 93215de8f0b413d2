"""Training the world's prior: the v loss through ComfyUI's own model call, on generic scenes.

Call `moa_pack.use_host(cpu=...)` before importing this module.

`train_prior(folder, PriorRecipe(...), log)` writes a world folder (models.py) whose UNet is the
EMA of the trained weights, the text encoder the frozen random one, the subject encoder random
(encoder.py trains it afterwards). Every random choice comes from the recipe's seed: scene
`step * batch + i` of the data seed, the step's noise and timesteps, the caption dropout, the init;
the same seed, step count and thread count give the same weights.

Each step: `batch` generic scenes (scenes.generic_scenes' distribution: 0-2 subjects, 0-2 objects)
-> WorldVAE latents -> x_t = x0 + sigma * eps at a uniform discrete timestep of SD1.5's schedule
-> `model.apply_model` (the call ComfyUI's sampler makes; the world's UNet predicts v) -> denoised
-> the v error, |x0 - denoised|^2 (sigma^2 + 1) / sigma^2. The caption is "" with probability
`uncond_prob` (ComfyUI's CFG negative is the empty prompt's encoding), else the scene's caption with
a share of its subjects described by their colours (`described`, scenes.described_caption). AdamW, linear warm-up then
cosine decay to a tenth.
"""

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import scenes as S
from .models import (
    CLIP_CONFIG,
    UNET_CONFIG,
    VERSION,
    VISION_CONFIG,
    WorldModels,
    WorldVAE,
    build_clip,
    build_unet,
    build_vision,
    save_world,
)

log = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "comfyui-moa" / "world"


@dataclass(frozen=True)
class PriorRecipe:
    seed: int = 0
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    uncond_prob: float = 0.1
    described: float = 0.5  # share of subjects whose caption describes their colours (scenes.described_caption)
    ema: float = 0.999
    threads: int = 2  # 2.6 steps/s on two idle cores, 1.6 on one

    def key(self) -> str:
        """The cache folder's name: what decides the weights (recipe, model configs, format version)."""
        facts = {"recipe": asdict(self), "unet": UNET_CONFIG, "clip": CLIP_CONFIG, "vision": VISION_CONFIG}
        facts["version"], facts["world"] = VERSION, S.WORLD_VERSION
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]
        return f"prior-s{self.seed}-{self.steps}-{digest}"


def cached_folder(recipe: PriorRecipe) -> Path:
    """Where the world built from `recipe` is cached: ~/.cache/comfyui-moa/world/<key>."""
    return CACHE / recipe.key()


class CaptionCache:
    """Caption -> text embedding [77, d], each encoded once by the frozen text encoder."""

    def __init__(self, clip: Any) -> None:
        self.clip, self.cache = clip, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for caption in set(captions) - set(self.cache):
            with torch.no_grad():
                self.cache[caption] = self.clip.encode_from_tokens(self.clip.tokenize(caption))[0].float()
        return torch.stack([self.cache[c] for c in captions])


def v_weight(sigma: torch.Tensor) -> torch.Tensor:
    """[b, 1, 1, 1]: the factor that makes the x0 error the v error, |v - v'|^2 = |x0 - x0'|^2 (sigma^2 + 1) / sigma^2
    (ComfyUI's V_PREDICTION, sigma_data 1)."""
    return ((sigma**2 + 1) / sigma**2).view(-1, 1, 1, 1)


def _lr_factor(step: int, recipe: PriorRecipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_prior(folder: str | Path, recipe: PriorRecipe, progress_file: Path | None = None) -> dict:
    """Train the prior and write the world folder; returns the training facts."""
    torch.set_num_threads(recipe.threads)
    unet, clip, vae = build_unet(recipe.seed), build_clip(recipe.seed + 1), WorldVAE()
    model = unet.model
    model.train()
    ema = [p.detach().clone() for p in model.diffusion_model.parameters()]
    params = list(model.diffusion_model.requires_grad_(True).parameters())  # newer comfy.ops make them frozen
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sampling = unet.get_model_object("model_sampling")
    captions = CaptionCache(clip)
    stream = open(progress_file, "w") if progress_file else None
    bar = tqdm(range(recipe.steps), file=stream, mininterval=10, desc="prior")
    start, losses = time.time(), []
    for step in bar:
        rng = np.random.default_rng([recipe.seed, step])
        batch = [S.sample_scene(S.scene_seed(recipe.seed, step * recipe.batch + i)) for i in range(recipe.batch)]
        images, _ = S.render_batch(batch)
        texts = ["" if rng.random() < recipe.uncond_prob else S.described_caption(s, rng, recipe.described)
                 for s in batch]  # fmt: skip
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = model.process_latent_in(vae.encode(images.movedim(1, -1)))
        t = torch.randint(0, len(sampling.sigmas), (recipe.batch,), generator=generator)
        sigma = sampling.sigma(t.float())
        noise = torch.randn(x0.shape, generator=generator)
        noisy = sampling.noise_scaling(sigma, noise, x0)
        denoised = model.apply_model(noisy, sigma, c_crossattn=captions(texts))
        loss = (((denoised - x0) ** 2) * v_weight(sigma)).mean()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    seconds = time.time() - start
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    model.eval().requires_grad_(False)
    facts = {
        "recipe": asdict(recipe),
        "key": recipe.key(),
        "seconds": round(seconds, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "loss_curve": [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
        "unet_parameters": sum(p.numel() for p in params),
        "encoder": "random (not trained yet)",
    }
    save_world(folder, WorldModels(unet, clip, vae, build_vision(folder, recipe.seed + 2)), facts)
    if stream:
        stream.close()
    log.info("prior: %d steps in %.0f s, loss %.4f -> %s", recipe.steps, seconds, facts["final_loss"], folder)
    return facts
