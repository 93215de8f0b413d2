"""The trainer's proof setup: tiny host models that can learn, and the run settings that go with them.

Shared by tests/train, the torchrun worker script (tests/train/ddp_worker.py), which must build
the very same models in each process, and tests/train/proof_on_device.py.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moa_testing.tiny import tiny_clip, tiny_clip_vision, tiny_model, tiny_sdxl_clip, tiny_vae


def scaled_init_(module: nn.Module, seed: int) -> nn.Module:
    """Norms as identities, biases 0, weights N(0, 1/fan_in): a random network whose activations
    keep their spread from layer to layer, as a trained one's do (tiny.fill_'s 0.02 everywhere
    shrinks them ~50x per norm layer, which leaves nothing for a router to read)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            for name, p in owner.named_parameters(recurse=False):
                if isinstance(owner, nn.GroupNorm | nn.LayerNorm):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.ndim < 2:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return module


def proof_models(folder: Path, seed: int = 0, family: str = "sd15"):
    """moa_train.models.Models of the tiny SD1.5 (or SDXL) UNet, its tiny text encoders (ComfyUI's
    real tokenizers), the tiny VAE and a 2-layer CLIP vision model with a 768-d projection (its
    config is written to `folder`)."""
    from moa_train.models import Models

    unet = tiny_model(family, seed)
    scaled_init_(unet.model.diffusion_model, seed)
    vision = tiny_clip_vision(folder, projection_dim=768, seed=seed)
    scaled_init_(vision.model, seed + 1)
    clip = tiny_clip(seed) if family == "sd15" else tiny_sdxl_clip(seed)
    return Models(unet, clip, tiny_vae(seed), vision, f"tiny_{family}", "tiny_clip_vision")


def proof_settings(root: Path, output: Path, steps: int = 120, **sections: dict[str, Any]) -> dict:
    """The proof run's config as TOML-shaped sections; `sections` update them (e.g. run={"steps": 4}).

    Against the SD1.5 recipe: 128 px images and 64 px crops (the tiny models' sizes); a router
    starting at 50/50 so that learning shows either way; learning rates scaled up for a run of
    120 steps, the routers' 200x the deltas' and fuser's, so that the routers sort pixels before
    the deltas can make up for any router weight; the object loss at weight 1 so that 120 steps
    show it, on all four cross-attention layers (the tiny UNet has one level besides the full
    resolution one that FastComposer leaves out, so its choice would be the middle block alone). The
    router loss has both halves (the trainer's default; docs/training.md has what the paper's half alone
    learns here)."""
    settings = {
        "data": {"root": str(root), "layout": "folder", "resolution": 128, "subject_resolution": 64, "workers": 0},
        "moa": {"prior_init": 0.5},
        "loss": {"object_layers": ["all"], "object_weight": 1.0},
        "optim": {"batch_size": 4, "lr_deltas": 1e-4, "lr_routers": 2e-2, "lr_fuser": 1e-4},
        "run": {"output": str(output), "steps": steps, "preview_every": 0, "save_every": 0, "progress": False},
    }
    for section, values in sections.items():
        settings[section] = {**settings.get(section, {}), **values}
    return settings


def host_tensors(models) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the frozen host models of `models`, cloned."""
    modules = {"unet": models.model.model, "clip": models.clip.cond_stage_model,
               "vae": models.vae.first_stage_model, "vision": models.vision.model}  # fmt: skip
    return {
        f"{prefix}.{name}": t.detach().clone()
        for prefix, module in modules.items()
        for name, t in (*module.named_parameters(), *module.named_buffers())
    }


def write_toml(path: Path, settings: dict) -> Path:
    """Sections of scalars and lists as a TOML file (JSON's literals are TOML's for these)."""
    import json

    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n")
    return path


HELD_OUT_TIMESTEPS = (50, 250)


def proof_run(config, models, held_out: Path, device: torch.device | None = None) -> tuple[dict, Any, float, dict]:
    """(held-out metrics of the untrained weights, moa_train's RunResult, seconds, held-out
    metrics of the trained weights): `config`'s run on `models`, evaluated on `held_out`."""
    import time

    from comfyui_moa.moa_core import load_weights
    from moa_train.evaluate import evaluate
    from moa_train.models import build_weights
    from moa_train.run import run

    before = evaluate(config, models, build_weights(config, models), held_out, HELD_OUT_TIMESTEPS, device)
    began = time.perf_counter()
    result = run(config, models)
    seconds = time.perf_counter() - began
    after = evaluate(config, models, load_weights(result.weights_path), held_out, HELD_OUT_TIMESTEPS, device)
    return before, result, seconds, after


def mask_learning_failures(held_out: dict) -> list[str]:
    """Where the trained routers did not learn the masks, per held-out timestep: the prior must take
    over 0.75 of the background, and at least 0.5 less of the subjects (the proof's runs: background
    0.83-0.86, subjects 0.05-0.15 over model, data and run seeds, SD1.5 and SDXL; a constant router
    leaves them within 0.2)."""
    failures = []
    for t, m in held_out.items():
        if not m["prior_background"] > 0.75:
            failures.append(f"{t}: prior weight on background {m['prior_background']:.3f} <= 0.75")
        if not m["prior_subject"] < m["prior_background"] - 0.5:
            failures.append(f"{t}: prior weight on subjects {m['prior_subject']:.3f} not 0.5 below background")
    return failures
