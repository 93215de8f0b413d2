"""The demo's shipped files: MoA weights trained by moa_train on the shipped prior, and photos of
two held-out identities for MoA Subject.

`python -m moa_world demo-weights [--steps N]` rewrites them from nothing (data seed 0, run seed 0,
one torch thread: the same command gives the same file); docs/small-world.md, *The demo*, has its time.
"""

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import scenes

ASSETS = Path(__file__).resolve().parent / "assets"
MOA_FOLDER = ASSETS / "moa"
MOA_FILE = MOA_FOLDER / "moa_world.safetensors"
SUBJECTS = ASSETS / "subjects"
DEMO_IDENTITIES = (scenes.HELD_OUT[0], scenes.HELD_OUT[4])  # an orange cat with a white rear, a brown white-headed dog
DEMO_STEPS = 3000  # the evaluation's run length (evaluate.Plan.moa_steps)


def subject_file(identity: scenes.Identity) -> Path:
    return SUBJECTS / f"moa_world_{identity.word}.png"


def write_subject_photos(seed: int = 0) -> list[Path]:
    """One photo per demo identity, RGBA: alpha is the subject's mask (LoadImage's MASK is its
    inverse, so the workflow inverts it for MoA Subject)."""
    SUBJECTS.mkdir(parents=True, exist_ok=True)
    paths = []
    for identity in DEMO_IDENTITIES:
        _, render = scenes.photo(identity, seed)
        rgb = (render.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        alpha = render.subject_masks[0].numpy().astype(np.uint8) * 255
        path = subject_file(identity)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
        paths.append(path)
    return paths


def shipped_world() -> Path:
    """The prior shipped in the repository (moa_world's assets)."""
    from .build import SHIPPED

    return SHIPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_world demo-weights", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--world", type=Path, help="default: the shipped prior")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(1)  # the same file on any machine with this torch
    from .moa import moa_settings, train_moa, train_models, write_data

    world = args.world or shipped_world()
    with tempfile.TemporaryDirectory(prefix="moa-world-demo-") as work:
        work = Path(work)
        data = write_data(work / "data", 0)
        trained = train_moa(train_models(world), moa_settings(world, data, work / "run", args.steps, 0))
        MOA_FOLDER.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trained.weights_path, MOA_FILE)
    photos = write_subject_photos()
    print(f"wrote {MOA_FILE} ({args.steps} steps, {trained.seconds:.0f} s) and {', '.join(p.name for p in photos)}")
    return 0
