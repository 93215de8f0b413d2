"""MoA trained on the small world by moa_train: the data in moa_train's folder layout (generic
creatures only, scenes.write_folder), the world's models through `[model] world`, and the run's
settings, which are moa_train's defaults except where the world's scale needs others (below)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scenes

TRAIN_SCENES = 2000
"""Scenes in MoA's training folder: generic creatures on every background, 30 % of them two."""


def moa_settings(world: Path, data: Path, output: Path, steps: int, seed: int, **sections: dict) -> dict:
    """moa_train's config (TOML-shaped sections) for MoA on the world; `sections` update them.

    Against the SD1.5 recipe (moa_train/config.py): 32 px images and 32 px subject crops (the
    world's sizes); no subject augmentation, since FastComposer's colour jitter, greyscale and
    elastic warp change exactly what tells the world's identities apart (body and mark colours,
    pattern); the object loss on every cross-attention layer (the world's UNet has none of
    FastComposer's SD1.5 paths) at weight 0.01, which its 7 layers need to move in a short run;
    the diffusion loss weighted as
    the v error (`weighting` "v", as the prior is trained), which spends the short run on the noise
    levels where a subject's colours are decided (eps weighting injected about half the identity);
    batch 16 and learning rates for a run of a few thousand steps rather than 50 000; the fuser's
    hidden layer 128 wide rather than the text width (32 here), too narrow for the 64-d image
    embedding: it carried the colour layout and mark poorly (see docs/small-world.md for the
    sweeps that chose these)."""
    settings = {
        "model": {"world": str(world)},
        "data": {
            "root": str(data), "layout": "folder", "resolution": scenes.SIZE, "subject_resolution": scenes.SIZE,
            "augment": False, "workers": 0,
        },
        "moa": {"fuser_hidden_dim": 128},
        "loss": {"object_layers": ["all"], "object_weight": 1e-2, "weighting": "v"},
        "optim": {"batch_size": 16, "lr_deltas": 1e-4, "lr_routers": 1e-3, "lr_fuser": 1e-3},
        "run": {
            "output": str(output), "name": "moa_world", "steps": steps, "seed": seed, "preview_every": 0,
            "save_every": 0, "progress": False, "log_every": 100, "device": "cpu",
        },
    }  # fmt: skip
    for section, values in sections.items():
        settings[section] = {**settings.get(section, {}), **values}
    return settings


def write_data(folder: Path, seed: int, count: int = TRAIN_SCENES) -> Path:
    """MoA's training scenes for data seed `seed` (cached: a folder with its keys is reused)."""
    done = folder / ".complete"
    if not done.is_file():
        scenes.write_folder(folder, count, seed)
        done.write_text(f"{count} scenes, seed {seed}\n")
    return folder


@dataclass(frozen=True)
class Trained:
    weights_path: Path
    seconds: float  # in training steps
    history: list  # moa_train's per-step rows


def train_moa(models: Any, settings: dict) -> Trained:
    """Run moa_train with `settings` on the loaded world `models` (moa_train.models.Models)."""
    from comfyui_moa.moa_train.config import TrainConfig
    from comfyui_moa.moa_train.run import run

    result = run(TrainConfig.from_dict(settings), models)
    return Trained(result.weights_path, result.train_seconds, result.history)


def train_models(world: Path) -> Any:
    """The world's models as moa_train loads them for `[model] world`."""
    from comfyui_moa.moa_train.config import TrainConfig
    from comfyui_moa.moa_train.models import load_models

    return load_models(TrainConfig.from_dict({"model": {"world": str(world)}}), on_gpu=False)
