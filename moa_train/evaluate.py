"""Held-out evaluation: the step's losses and router metrics at fixed timesteps, no augmentation,
no dropout, every subject conditioned, fixed noise."""

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from comfyui_moa.moa_core import MoAWeights

from .config import TrainConfig
from .data import open_layout
from .models import Models, training_model
from .samples import CaptionBinder, TrainingSamples, collate

METRICS = ("masked_diffusion", "router", "router_subject", "object", "prior_background", "prior_subject")


@torch.no_grad()
def evaluate(
    config: TrainConfig,
    models: Models,
    weights: MoAWeights,
    root: str | Path,
    timesteps: Sequence[int] = (100, 250, 400),
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Mean metrics over every record of `root` (in `config`'s data layout) at each timestep
    (0-999): {"t=100": {"prior_background": ..., ...}, ..., "all": {...}}. prior_background and
    prior_subject are the mean prior weight r0 over background and subject pixels."""
    device = device or next(weights.parameters()).device
    module, _ = training_model(config.replace("optim", vision_layers=0), models, weights, device)
    layout = open_layout(config.data.layout, root, config.data.split, config.data.object_types)
    samples = TrainingSamples(layout, config.data, config.run.seed, 1, CaptionBinder(models.clip))
    results: dict[str, dict[str, float]] = {}
    overall = defaultdict(list)
    for t in timesteps:
        fraction = (t + 0.5) / 1000  # the middle of the step, safe from rounding
        examples = [samples.fixed_example(i, fraction, seed=i) for i in range(len(samples))]
        sums = defaultdict(list)
        for first in range(0, len(examples), config.optim.batch_size):
            out = module(collate(examples[first : first + config.optim.batch_size]))
            for name in METRICS:
                sums[name].append(float(out[name]))
        results[f"t={t}"] = {name: sum(values) / len(values) for name, values in sums.items()}
        for name, values in sums.items():
            overall[name].extend(values)
    results["all"] = {name: sum(values) / len(values) for name, values in overall.items()}
    return results
