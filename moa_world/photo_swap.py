"""The real-photo swap measured on the small world (issue 16): scenes of generic creatures the prior
never saw (the world's "real photos", with their ground-truth masks) inverted with the prior by MoA
Invert, sampled back by MoA Regenerate with the plain prior (the reconstruction) and with MoA and
each held-out identity of the photo's word (the swap), with keep_outside off and on (the router's
maps), and with MoA's router forced to the personal expert (no router). Scored by the world's judges.

`python -m moa_world photo-swap [--weights FILE] [--photos 4] [--steps 20] [--cfg 1] [--out DIR]`
prints the table and writes `photo_swap.png` (GRID_COLUMNS, one row per word and background) and
`photo_swap.json`. Default weights: the demo's, shipped in the repository. Call
`moa_pack.use_host(cpu=...)` before importing this module.
"""

import argparse
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from comfyui_moa.moa_core import RouterMode, load_weights
from comfyui_moa.nodes.apply import MoAApply
from comfyui_moa.nodes.inversion import MoAInvert, MoARegenerate

from . import metrics, scenes
from .demo import MOA_FILE, shipped_world
from .graph import MoAInput, encode_subjects, encode_text, subject_photos
from .grids import rows_picture
from .metrics import table_lines
from .models import load_world
from .report import Tally, open_run, prompt, score_single


@dataclass(frozen=True)
class SwapPlan:
    photos: int = 4  # photos per (word, background) cell: one inversion batch
    steps: int = 20
    scheduler: str = "normal"
    cfg: float = 1.0
    refine: int = 2
    seed: int = 0  # the photos' scenes and the subject photos MoA Subject encodes
    subject_photos: int = 3


def photo_scenes(word: str, background: str, count: int, seed: int) -> list[scenes.Render]:
    """`count` scenes of one generic creature of `word` on `background`, no objects: the photos."""
    base = seed * 1_000_003 + scenes.SUBJECT_WORDS.index(word) * 7919 + scenes.BACKGROUNDS.index(background) * 101
    renders = []
    for k in range(count):
        rng = np.random.default_rng(base + k)
        identity = scenes.generic_identity(rng, word)
        layout = int(rng.integers(2**31))
        renders.append(
            scenes.render(scenes.sample_scene(layout, identities=(identity,), n_objects=0, background=background))
        )
    return renders


class Regenerate:
    """MoA Invert and MoA Regenerate, called as a graph calls them, on the world's models."""

    def __init__(self, models: Any, plan: SwapPlan) -> None:
        self.models, self.plan = models, plan
        self.negative = encode_text(models.clip, "")

    def invert(self, text: str, latent: torch.Tensor) -> dict:
        """MoA Invert of `latent` (VAE Encode's samples) with the prior."""
        plan = self.plan
        (inversion,) = MoAInvert.invert(
            self.models.model, encode_text(self.models.clip, text), self.negative, {"samples": latent}, plan.steps,
            plan.scheduler, plan.cfg, plan.refine,
        )  # fmt: skip
        return inversion

    def back(self, inversion: dict, text: str, moa: Any = None, keep_outside: bool = False) -> tuple:
        """(images [b, 32, 32, 3], latents) sampled back with the prior (`moa` None) or MoA Apply."""
        model, positive, record = self.models.model, encode_text(self.models.clip, text), None
        if moa is not None:
            model, positive, record = MoAApply.apply(
                model, moa.weights, self.models.clip, text, ", ".join(moa.words), moa.subjects,
                moa.strength, 0.0, 1.0, router=moa.router.value,
            )  # fmt: skip
        (out,) = MoARegenerate.regenerate(model, positive, self.negative, inversion, keep_outside, record)
        latents = out["samples"]
        return self.models.vae.decode(latents).float().clamp(0, 1), latents


@torch.no_grad()
def measure(models: Any, moa_weights: Any, judges: Any, plan: SwapPlan) -> tuple[dict, list]:
    """The figures (means over photos and identities) and the grid's rows; `moa_weights` is MOA_WEIGHTS."""
    tally, rows = Tally(), []
    subjects = {i: encode_subjects(models.vision, [i], plan.subject_photos, plan.seed) for i in scenes.HELD_OUT}
    regenerate = Regenerate(models, plan)
    for word in scenes.SUBJECT_WORDS:
        identities = [i for i in scenes.HELD_OUT if i.word == word]
        rows.append({f"swap{j}": subject_photos(identity, 1, plan.seed)[0] for j, identity in enumerate(identities)})
        for background in scenes.BACKGROUNDS:
            renders = photo_scenes(word, background, plan.photos, plan.seed)
            photos = torch.stack([r.image.permute(1, 2, 0) for r in renders])
            truth = torch.stack([r.subject_masks[0] for r in renders])
            text = prompt((word,), background)
            original = models.vae.encode(photos)
            inversion = regenerate.invert(text, original)
            rebuilt, latents = regenerate.back(inversion, text)
            tally.add("recon_latent", metrics.relative_error(latents, original))
            tally.add("recon_outside", metrics.outside_change(rebuilt, photos, truth))
            tally.add("recon_inside", metrics.inside_change(rebuilt, photos, truth))
            row = {"photo": photos, "reconstruction": rebuilt}
            for j, identity in enumerate(identities):
                index = scenes.HELD_OUT.index(identity)
                for name, mode, keep in (
                    ("moa", RouterMode.LEARNED, False),
                    ("moa_keep", RouterMode.LEARNED, True),
                    ("personal", RouterMode.PERSONAL, False),
                ):
                    moa = MoAInput(moa_weights, (word,), subjects[identity], mode)
                    images, _ = regenerate.back(inversion, text, moa, keep)
                    judged = judges.judge(images, (word,))
                    subject = truth | judged.masks[:, 0]
                    tally.add(f"identity_{name}", judged.identity[:, 0] == index)
                    tally.add(f"background_{name}", judged.background == scenes.BACKGROUNDS.index(background))
                    tally.add(f"outside_{name}", metrics.outside_change(images, photos, subject))
                    tally.add(f"inside_{name}", metrics.inside_change(images, photos, subject))
                    if name == "moa_keep":
                        row[f"swap{j}"] = images
                    elif j == 0:
                        row[name] = images
            rows.append(row)
    figures = tally.means()
    for name in ("moa", "moa_keep", "personal"):
        figures[f"outside_{name}_over_recon"] = figures[f"outside_{name}"] / max(figures["recon_outside"], 1e-8)
    return figures, rows


ROWS = (
    ("reconstruction: relative latent error", "recon_latent"),
    ("reconstruction: pixel change outside the subject", "recon_outside"),
    ("reconstruction: pixel change inside the subject", "recon_inside"),
    ("swap, MoA: identity accuracy (chance 1/8)", "identity_moa"),
    ("swap, MoA + keep_outside: identity accuracy", "identity_moa_keep"),
    ("swap, no router: identity accuracy", "identity_personal"),
    ("swap, MoA: background accuracy", "background_moa"),
    ("swap, no router: background accuracy", "background_personal"),
    ("swap, MoA: pixel change outside the subject", "outside_moa"),
    ("swap, MoA + keep_outside: pixel change outside", "outside_moa_keep"),
    ("swap, no router: pixel change outside", "outside_personal"),
    ("  MoA outside / reconstruction outside", "outside_moa_over_recon"),
    ("  MoA + keep_outside outside / reconstruction outside", "outside_moa_keep_over_recon"),
    ("  no router outside / reconstruction outside", "outside_personal_over_recon"),
    ("swap, MoA: pixel change inside the subject", "inside_moa"),
    ("swap, MoA + keep_outside: pixel change inside", "inside_moa_keep"),
    ("swap, no router: pixel change inside", "inside_personal"),
    ("MoA from noise (same weights, the evaluation's sampler): identity accuracy", "identity_from_noise"),
)


GRID_COLUMNS = ("photo", "reconstruction", "swap0", "swap1", "swap2", "swap3", "moa", "personal")
"""The grid's columns: the photo, the prior's reconstruction, MoA's swap (keep_outside on) with each
held-out identity of the photo's word (in scenes.HELD_OUT order), the first identity's without
keep_outside and with no router (keep_outside off). Above each word's rows, its identities' subject photos."""


def format_table(runs: list[dict]) -> str:
    return "\n".join(table_lines(runs, ROWS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_world photo-swap", description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, help="default: the prior shipped in the repository")
    parser.add_argument("--weights", type=Path, default=MOA_FILE, help="MoA weights trained on that prior")
    parser.add_argument("--photos", type=int, default=SwapPlan.photos, help="photos per word and background")
    parser.add_argument("--steps", type=int, default=SwapPlan.steps)
    parser.add_argument("--cfg", type=float, default=SwapPlan.cfg)
    parser.add_argument("--refine", type=int, default=SwapPlan.refine)
    parser.add_argument("--seeds", default="0", help="comma-separated photo seeds (one run each)")
    parser.add_argument("--out", type=Path, default=Path("world_photo_swap"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(args.threads)
    models = load_world(args.world or shipped_world())
    weights = load_weights(args.weights)
    first = open_run(models, weights, 0, 1)  # one MOA_WEIGHTS for every run: ComfyUI warns of a leak otherwise
    runs = []
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        began = time.monotonic()
        plan = SwapPlan(args.photos, args.steps, cfg=args.cfg, refine=args.refine, seed=seed)
        figures, rows = measure(models, first.moa, first.judges, plan)
        run = replace(first, seed=seed, tally=Tally(), shown=defaultdict(dict), prior={}, moa_images={})
        score_single(run, scenes.BACKGROUNDS)
        figures["identity_from_noise"] = run.tally.means()["identity_moa"]
        figures.update(plan=asdict(plan), seconds=time.monotonic() - began)
        runs.append(figures)
        if len(runs) == 1:
            Image.fromarray(rows_picture(rows, GRID_COLUMNS)).save(args.out / "photo_swap.png")
        print(format_table([figures]), flush=True)
    table = format_table(runs)
    print(table)
    (args.out / "photo_swap.md").write_text(table + "\n")
    (args.out / "photo_swap.json").write_text(json.dumps({"weights": str(args.weights), "runs": runs}, indent=1))
    return 0
