"""The small world's short MoA run for CI (tests/train/test_world.py): moa_train on the prior shipped in
the repository (moa_world/assets/prior), then the held-out router figures and a few samples judged."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SHORT_STEPS = 150
SHORT_SCENES = 600


@dataclass(frozen=True)
class ShortRun:
    world: Path
    models: Any  # moa_train.models.Models of the world
    weights: Any  # the trained MoAWeights
    seed: int


def shipped_world() -> Path:
    """The prior shipped in the repository (the fp16 copy of the seed-0 world, so CI trains no prior);
    missing, it fails with the command that rewrites it."""
    from comfyui_moa.moa_world.build import SHIPPED

    if not (SHIPPED / "world.json").is_file():
        pytest.fail(f"no shipped small world at {SHIPPED}; run `python -m moa_world build` then `... ship`")
    return SHIPPED


def short_run(tmp: Path, seed: int = 0) -> ShortRun:
    import comfy.cli_args

    from comfyui_moa.moa_core import load_weights
    from comfyui_moa.moa_world.moa import moa_settings, train_moa, train_models, write_data

    comfy.cli_args.args.use_pytorch_cross_attention = True  # read when the attention is chosen per call
    world = shipped_world()
    models = train_models(world)
    data = write_data(tmp / "data", seed, SHORT_SCENES)
    trained = train_moa(models, moa_settings(world, data, tmp / "run", SHORT_STEPS, seed))
    return ShortRun(world, models, load_weights(trained.weights_path), seed)


def held_out_router(run: ShortRun) -> dict:
    from comfyui_moa.moa_world.report import held_out_router as figures

    return figures(run.world, run.models, run.weights, run.seed)
