"""Building, caching and shipping the world: one call per artefact, each built when absent.

Call `moa_pack.use_host(cpu=...)` before importing this module.

- `world_folder(seed=0, build=True) -> Path`: the trained world (prior + subject encoder) of a
  prior seed, cached at ~/.cache/comfyui-moa/world/<PriorRecipe(seed).key()>; built when absent
  (about 35 min of prior, then a few minutes of encoder, on 2 shared cores).
- `judges_folder(build=True) -> Path`: the judges (judges.py), cached at
  ~/.cache/comfyui-moa/world/judges-<key>; they depend on the world generator only, not on a prior.
- `SHIPPED`: <repo>/moa_world/assets/prior, the fp16 copy of the seed-0 world in the repo
  (`ship(source)` writes it: `python -m moa_world ship`); `load_world(SHIPPED)` loads it.
"""

import hashlib
import json
import logging
from pathlib import Path

import torch

from . import scenes as S
from .models import load_world, save_world
from .train import CACHE, PriorRecipe, cached_folder, train_prior

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "assets" / "prior"
JUDGES_RECIPE = {"seed": 0, "steps": 800, "batch": 48, "version": 2}  # 2: the attribute identity judge


def _facts(folder: Path) -> dict:
    return json.loads((folder / "world.json").read_text())["facts"]


def train_encoder_into(folder: Path, seed: int = 0, steps: int | None = None) -> dict:
    """Train the subject encoder of the world in `folder` and rewrite the folder with it."""
    from .encoder import encoder_report, train_encoder

    world = load_world(folder)
    facts, heads = train_encoder(world.vision, seed, **({"steps": steps} if steps else {}), log=log.info)
    facts["encoder_report"] = encoder_report(world.vision, heads)
    merged = {**_facts(folder), **facts}
    save_world(folder, world, merged)
    log.info("encoder: %s", facts["encoder_report"])
    return merged


def world_folder(seed: int = 0, build: bool = True, progress_file: Path | None = None) -> Path:
    """The cached world of prior seed `seed`, built (prior, then encoder) when absent."""
    recipe = PriorRecipe(seed=seed)
    folder = cached_folder(recipe)
    done = (folder / "world.json").is_file() and "encoder_report" in _facts(folder)
    if done or not build:
        if not done:
            raise ValueError(f"{folder}: no trained world; build it with `python -m moa_world build --seed {seed}`")
        return folder
    if not (folder / "world.json").is_file():
        train_prior(folder, recipe, progress_file)
    train_encoder_into(folder, seed)
    return folder


def judges_folder(build: bool = True) -> Path:
    """The cached judges, trained when absent (about 15 min on 2 shared cores)."""
    from .judges import judge_report, train_judges

    key = hashlib.sha256(json.dumps({**JUDGES_RECIPE, "world": S.WORLD_VERSION}, sort_keys=True).encode()).hexdigest()
    folder = CACHE / f"judges-{key[:10]}"
    if (folder / "judges.safetensors").is_file() or not build:
        if not (folder / "judges.safetensors").is_file():
            raise ValueError(f"{folder}: no judges; train them with `python -m moa_world judges`")
        return folder
    recipe = {k: v for k, v in JUDGES_RECIPE.items() if k != "version"}
    judges = train_judges(**recipe, log=log.info)
    judges.facts["report"] = judge_report(judges)
    judges.save(folder)
    log.info("judges on real images: %s", judges.facts["report"])
    return folder


def ship(source: Path, target: Path = SHIPPED) -> Path:
    """Write the fp16 copy of the world in `source` to `target` (the repo's assets)."""
    world = load_world(source)
    save_world(target, world, {**_facts(source), "shipped_from": source.name, "dtype": "fp16"}, torch.float16)
    return target
