"""The small world's evaluation: MoA trained by moa_train on the world's prior, measured against the
prior, MoA with no router (the personal expert everywhere) and a per-subject fine-tune, on held-out
identities, all sampled through the pack's nodes (MoA Subject, MoA Apply) and comfy.sample.sample.

`python -m moa_world evaluate [--seeds N] [--prior-seeds 0,1] [--out DIR]` builds what is missing
(the world with W's build, MoA's data, MoA), prints the table and writes grids and table.json.
"""

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import scenes
from .metrics import spread, table_lines

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one evaluation run trains and samples."""

    moa_steps: int = 3000
    moa_scenes: int = 2000
    batch: int = 4  # seeds per (identity, background) cell
    pairs: int = 8  # two-subject (cat, dog) identity pairs
    pair_batch: int = 2
    finetune_identities: int = 2  # identities the per-subject fine-tune is run for (a cat and a dog)
    finetune_steps: int = 150
    photos: int = 3  # reference photos per subject for MoA Subject
    sampling: Any = None  # sampling.SampleSettings; None: its defaults


QUICK = Plan(moa_steps=150, moa_scenes=600, batch=1, pairs=2, pair_batch=1, finetune_identities=1, finetune_steps=30)
"""Every figure on fewer images: a few minutes on 2 cores (checks the command, not the method)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_world evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("world_eval"), help="folder for table, grids, MoA weights")
    parser.add_argument("--seeds", type=int, default=1, help="MoA runs (data and initialisation seeds)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first MoA run's seed (then +1, ...)")
    parser.add_argument("--prior-seeds", default="0", help="comma-separated seeds of the priors (W's build)")
    parser.add_argument(
        "--moa-steps", type=int, default=None, help=f"default: {Plan.moa_steps} ({QUICK.moa_steps} quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer seeds, pairs, fine-tune steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--world", type=Path, help="use this world folder instead of building one")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a moa_train setting, e.g. optim.lr_routers=1e-3 (the sweeps)")  # fmt: skip
    parser.add_argument("--no-baselines", action="store_true", help="skip the fine-tune baseline")
    parser.add_argument("--router-only", action="store_true", help="train, then only the held-out router figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    if args.moa_steps is not None:
        plan = replace(plan, moa_steps=args.moa_steps)
    if args.no_baselines:
        plan = replace(plan, finetune_identities=0)
    overrides: dict = {}
    for item in args.set:
        target, _, value = item.partition("=")
        section, _, key = target.partition(".")
        overrides.setdefault(section, {})[key] = json.loads(value)
    runs = []
    for prior_seed in [int(s) for s in args.prior_seeds.split(",")]:
        world = args.world or world_folder(prior_seed)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            began = time.monotonic()
            out = args.out / f"prior{prior_seed}_moa{seed}"
            result = evaluate_run(
                world, seed, plan, out, overrides, grids=seed == args.first_seed, router_only=args.router_only
            )
            result["prior_seed"], result["moa_seed"] = prior_seed, seed
            result["seconds"] = time.monotonic() - began
            runs.append(result)
            (out / "result.json").write_text(json.dumps(result, indent=1))
            print(format_table([result]), flush=True)
    table = format_table(runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps({"plan": asdict(plan), "runs": runs}, indent=1))
    return 0


def world_folder(seed: int) -> Path:
    """The world (prior, judges, encoder) of `seed`, built by moa_world's own command if absent."""
    from .build import world_folder as build_world_folder

    return build_world_folder(seed)


def evaluate_run(
    world: Path, seed: int, plan: Plan, out: Path, overrides: dict, grids: bool, router_only: bool = False
) -> dict:
    """Train MoA (seed `seed` for its data and initialisation) on `world`, then measure it."""
    from comfyui_moa.moa_core import load_weights

    from .moa import moa_settings, train_moa, train_models, write_data
    from .report import DATA_CACHE, held_out_router, measure

    out.mkdir(parents=True, exist_ok=True)
    models = train_models(world)
    data = write_data(DATA_CACHE / f"train_{seed}_{plan.moa_scenes}", seed, plan.moa_scenes)
    settings = moa_settings(world, data, out, plan.moa_steps, seed, **overrides)
    trained = train_moa(models, settings)
    logger.info("MoA trained: %d steps in %.0f s", plan.moa_steps, trained.seconds)
    weights = load_weights(trained.weights_path)
    if router_only:
        figures = held_out_router(world, models, weights, seed)
    else:
        figures = measure(world, models, weights, plan, out if grids else None, seed)
    figures["moa_train_seconds"] = trained.seconds
    figures["settings"] = settings
    return figures


ROWS = (
    ("identity accuracy, MoA (chance 1/8)", "identity_moa"),
    ("  MoA's body colour right (chance 1/6)", "body_moa"),
    ("  MoA's colour layout right (chance 1/3)", "pattern_moa"),
    ("  MoA's mark colour right (chance 1/6)", "mark_moa"),
    ("identity accuracy, no router", "identity_personal"),
    ("identity accuracy, MoA with the router read from attention", "identity_attention"),
    ("identity accuracy, fine-tune", "identity_finetune"),
    ("identity accuracy, prior (no subject)", "identity_prior"),
    ("background accuracy, prior", "background_prior"),
    ("background accuracy, MoA", "background_moa"),
    ("background accuracy, no router", "background_personal"),
    ("background accuracy, router read from attention", "background_attention"),
    ("background accuracy, fine-tune", "background_finetune"),
    ("pixel change outside subject vs prior, MoA", "outside_moa"),
    ("pixel change outside subject vs prior, no router", "outside_personal"),
    ("pixel change outside subject vs prior, router read from attention", "outside_attention"),
    ("pixel change outside subject vs prior, fine-tune", "outside_finetune"),
    ("  MoA / no router", "outside_ratio"),
    ("router IoU with the subject (all layers, all steps)", "iou_all"),
    ("router IoU, the router read from attention (steps after its warm-up)", "iou_attention"),
    ("two subjects: both right", "pair_both_right"),
    ("two subjects: swapped", "pair_swapped"),
    ("subject swap at a fixed seed: change outside", "swap_outside"),
    ("subject swap at a fixed seed: change inside", "swap_inside"),
    ("router: prior weight on background (held out)", "prior_background"),
    ("router: prior weight on subject (held out)", "prior_subject"),
)
TARGETS = {
    "identity_moa": ">= 0.8",
    "background_moa": "within 0.05 of the prior",
    "outside_ratio": "<= 0.25",
    "iou_all": ">= 0.6",
    "pair_both_right": ">= 0.6",
}


def format_table(runs: list[dict]) -> str:
    """Markdown: one row per figure, its value (mean ± sd (min-max) over runs), the target."""
    lines = table_lines(runs, ROWS, TARGETS)
    groups = sorted({key for run in runs for key in run if key.startswith("iou:")})
    for key in groups:
        lines.append(f"| router IoU, {key[4:]} | {spread([run[key] for run in runs if key in run])} | |")
    return "\n".join(lines)


def load_for_demo(world: Path) -> Any:
    """The world's models as the evaluation samples them."""
    from .models import load_world

    return load_world(world)


__all__ = ["QUICK", "Plan", "evaluate_run", "format_table", "main", "scenes"]
