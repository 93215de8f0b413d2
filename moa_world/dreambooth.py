"""The per-subject fine-tune baseline (DreamBooth-style): a copy of the prior whose attention layers
(every attn1/attn2 q, k, v, out) are trained on one identity's photos with their captions, which
name the subject by its word ("a cat on grass"). No prior-preservation loss: this is the plain
fine-tune the paper sets MoA against, where identity comes at the cost of the prior's context."""

import copy
from dataclasses import dataclass
from typing import Any

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher

from comfyui_moa.moa_train.step import encode_captions

from . import scenes


@dataclass(frozen=True)
class FineTune:
    photos: int = 12  # photos of the identity (scenes.photo), each on its own background
    steps: int = 150
    batch: int = 8
    lr: float = 2e-4


def attention_parameters(diffusion_model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in diffusion_model.named_parameters() if ".attn1." in name or ".attn2." in name]


def fine_tune(models: Any, identity: scenes.Identity, settings: FineTune = FineTune(), seed: int = 0) -> ModelPatcher:
    """A ModelPatcher of the prior with its attention fine-tuned on `identity`'s photos; the
    world's own model is left as it was."""
    with torch.enable_grad():  # the evaluation samples under no_grad
        return _fine_tune(models, identity, settings, seed)


def _fine_tune(models: Any, identity: scenes.Identity, settings: FineTune, seed: int) -> ModelPatcher:
    base = copy.deepcopy(models.model.model)
    diffusion = base.diffusion_model
    diffusion.requires_grad_(False)
    params = attention_parameters(diffusion)
    for p in params:
        p.requires_grad_(True)
    renders = [scenes.photo(identity, 10_000 + seed * 100 + i) for i in range(settings.photos)]
    images = torch.stack([r.image.permute(1, 2, 0) for _, r in renders])
    tokens = [models.clip.tokenize(scene.caption) for scene, _ in renders]
    with torch.no_grad():
        x0 = base.process_latent_in(models.vae.encode(images))
        context, _ = encode_captions(models.clip, tuple(tokens))
    sampling = base.model_sampling
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    base.train()
    for _ in range(settings.steps):
        rows = torch.randint(0, len(renders), (settings.batch,), generator=generator)
        t = torch.randint(0, len(sampling.sigmas), (settings.batch,), generator=generator)
        sigma = sampling.sigma(t.float())
        noise = torch.randn(x0[rows].shape, generator=generator)
        noisy = sampling.noise_scaling(sigma, noise, x0[rows])
        denoised = base.apply_model(noisy, sigma, c_crossattn=context[rows])
        prediction = (noisy - denoised) / sigma.view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    base.eval().requires_grad_(False)
    return ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
