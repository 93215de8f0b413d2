"""One evaluation run's figures and grids: the prior, MoA, MoA with no router and the per-subject
fine-tune sampled at the same seeds on held-out identities, scored by the world's judges.

Cells: every held-out identity on every background, `plan.batch` seeds each. A cell's seed depends
on its word and background only, so the prior's image is the same for every identity of a word,
and two identities' MoA images at a seed are a subject swap at a fixed seed.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher

from comfyui_moa.moa_core import RouterMode
from comfyui_moa.moa_core.unet_layout import layers_in_group

from . import metrics, scenes
from .graph import MoAInput, encode_subjects, sample
from .grids import save_grids
from .judges import HELD_OUT_ATTRIBUTES

logger = logging.getLogger(__name__)

DATA_CACHE = Path.home() / ".cache" / "comfyui-moa" / "world-eval"
"""Scenes the evaluation writes (MoA's training and held-out folders), rebuilt from their seeds."""
GROUPS = ("down", "middle", "up", "self-attention", "cross-attention")
STEP_RANGES = ("early", "middle", "late")  # thirds of the sampling steps


def prompt(words: tuple[str, ...], background: str) -> str:
    subjects = " and ".join(f"a {word}" for word in words)
    return f"{subjects} {scenes.BACKGROUND_PHRASES[background]}"


def cell_seeds(words: tuple[str, ...], background: str, base: int, count: int) -> list[int]:
    """The noise seeds of a cell: they depend on its words and background (and the run), not its identities."""
    first = base * 1_000_003 + sum(ord(c) for c in "".join(words)) * 1009 + scenes.BACKGROUNDS.index(background) * 101
    return [first + k for k in range(count)]


def weights_model(weights: Any) -> ModelPatcher:
    """MoA Loader's output for in-memory weights."""
    return ModelPatcher(weights.eval(), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def router_maps(record: Any, batch: int, layers: list[int], steps: list[int]) -> torch.Tensor:
    """Mean r1 of `layers` over sampling `steps`, [b, 32, 32]."""
    return record.stack((scenes.SIZE, scenes.SIZE), layers, steps, batch).mean((0, 1))


def step_ranges(record: Any) -> dict[str, list[int]]:
    steps = record.steps()
    third = max(1, len(steps) // 3)
    return {"early": steps[:third], "middle": steps[third:-third] or steps, "late": steps[-third:], "all": steps}


class Tally:
    """Per-image values by figure name; `means()` gives their means."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, values: torch.Tensor | float) -> None:
        values = values.reshape(-1).tolist() if isinstance(values, torch.Tensor) else [float(values)]
        self.values[name].extend(values)

    def means(self) -> dict[str, float]:
        return {name: sum(v) / len(v) for name, v in self.values.items() if v}


@dataclass
class Run:
    """What the scoring steps share."""

    models: Any
    weights: Any
    moa: Any  # MOA_WEIGHTS of `weights`
    judges: Any  # judging.WorldJudges
    seed: int
    batch: int
    photos: int = 3
    settings: Any = None  # sampling.SampleSettings
    tally: Tally = field(default_factory=Tally)
    shown: dict = field(default_factory=lambda: defaultdict(dict))  # (identity, background) -> {column: image}
    prior: dict = field(default_factory=dict)  # (word, background) -> images
    moa_images: dict = field(default_factory=dict)  # (identity index, background) -> (images, judged)


def open_run(models: Any, weights: Any, seed: int, batch: int, photos: int = 3, settings: Any = None) -> Run:
    from .build import judges_folder
    from .judging import WorldJudges

    return Run(models, weights, weights_model(weights), WorldJudges(judges_folder()), seed, batch, photos, settings)


@torch.no_grad()
def measure(world: Path, models: Any, weights: Any, plan: Any, grid_out: Path | None, seed: int) -> dict:
    """The run's figures (see evaluate.ROWS), grids in `grid_out` when given."""
    run = open_run(models, weights, seed, plan.batch, plan.photos, plan.sampling)
    score_single(run, scenes.BACKGROUNDS)
    _score_swaps(run.tally, run.moa_images)
    _score_pairs(run.tally, models, run.moa, run.judges, plan, seed)
    _score_finetune(run.tally, models, run.judges, plan, seed, run.prior, run.shown)
    figures = run.tally.means()
    _derived(figures)
    figures.update(held_out_router(world, models, weights, seed))
    if grid_out is not None:
        save_grids(grid_out, run.shown)
    return figures


@torch.no_grad()
def single_subject(models: Any, weights: Any, backgrounds: tuple[str, ...], batch: int, seed: int) -> dict:
    """Every held-out identity on `backgrounds`: the prior's, MoA's and no router's figures."""
    run = open_run(models, weights, seed, batch)
    score_single(run, backgrounds)
    figures = run.tally.means()
    _derived(figures)
    return figures


def score_single(run: Run, backgrounds: tuple[str, ...]) -> None:
    """The prior, MoA and no router on every held-out identity and background."""
    tally, shown = run.tally, run.shown
    for word in scenes.SUBJECT_WORDS:
        for background in backgrounds:
            seeds = cell_seeds((word,), background, run.seed, run.batch)
            images, _ = sample(run.models, prompt((word,), background), seeds, settings=run.settings)
            run.prior[(word, background)] = images
            judged = run.judges.judge(images, (word,))
            tally.add("background_prior", judged.background == scenes.BACKGROUNDS.index(background))
    for index, identity in enumerate(scenes.HELD_OUT):
        subjects = encode_subjects(run.models.vision, [identity], run.photos, run.seed)
        for background in backgrounds:
            text, cell = (
                prompt((identity.word,), background),
                cell_seeds((identity.word,), background, run.seed, run.batch),
            )
            base = run.prior[(identity.word, background)]
            base_judged = run.judges.judge(base, (identity.word,))
            tally.add("identity_prior", base_judged.identity[:, 0] == index)
            for name, mode in VARIANTS:
                images, record = sample(run.models, text, cell, MoAInput(run.moa, (identity.word,), subjects, mode),
                                        run.settings)  # fmt: skip
                judged = run.judges.judge(images, (identity.word,))
                _score_single(tally, name, images, judged, base, base_judged, index, background)
                if name == "attention":
                    every = list(range(len(run.weights.paths)))
                    maps = router_maps(record, run.batch, every, step_ranges(record)["all"])
                    tally.add("iou_attention", metrics.iou(maps, judged.masks[:, 0]))
                if name == "moa":
                    run.moa_images[(index, background)] = (images, judged)
                    _score_router(tally, record, run.weights.paths, judged.masks[:, 0], run.batch)
                    every = list(range(len(run.weights.paths)))
                    shown[(identity, background)]["router"] = router_maps(
                        record, run.batch, every, step_ranges(record)["all"]
                    )
                shown[(identity, background)][name] = images
            shown[(identity, background)]["prior"] = base
            shown[(identity, background)]["photo"] = _photo(identity, run.seed)


VARIANTS = (("moa", RouterMode.LEARNED), ("personal", RouterMode.PERSONAL), ("attention", RouterMode.ATTENTION))
"""MoA with its learned router, with none (the personal expert everywhere), and with the router read
from the prior's cross-attention (MoA Apply's "from attention") instead of the learned one."""


def _photo(identity: scenes.Identity, seed: int) -> torch.Tensor:
    from .graph import subject_photos

    return subject_photos(identity, 1, seed)[0]


def _score_single(tally, name, images, judged, base, base_judged, index, background) -> None:
    tally.add(f"identity_{name}", judged.identity[:, 0] == index)
    if name == "moa":  # what of the subject's look MoA carries: its colours and their layout
        truth = HELD_OUT_ATTRIBUTES[index]
        for k, attribute in enumerate(scenes.ATTRIBUTES):
            if attribute != "word":  # the prompt's word decides it
                tally.add(f"{attribute}_moa", judged.attributes[:, 0, k] == truth[k])
    tally.add(f"background_{name}", judged.background == scenes.BACKGROUNDS.index(background))
    subject = judged.masks.any(1) | base_judged.masks.any(1)
    tally.add(f"outside_{name}", metrics.outside_change(images, base, subject))


def _score_router(tally: Tally, record: Any, paths: list[str], masks: torch.Tensor, batch: int) -> None:
    everything = list(range(len(paths)))
    ranges = step_ranges(record)
    tally.add("iou_all", metrics.iou(router_maps(record, batch, everything, ranges["all"]), masks))
    for group in GROUPS:
        layers = layers_in_group(paths, group)
        if not layers:
            continue
        for span in STEP_RANGES:
            maps = router_maps(record, batch, layers, ranges[span])
            tally.add(f"iou:{group}, {span} steps", metrics.iou(maps, masks))


def _score_swaps(tally: Tally, moa_images: dict) -> None:
    """Identities of one word at the same seed: the change outside and inside their subjects."""
    for background in scenes.BACKGROUNDS:
        for word in scenes.SUBJECT_WORDS:
            ids = [i for i, identity in enumerate(scenes.HELD_OUT) if identity.word == word]
            for a in ids:
                for b in ids:
                    if a >= b:
                        continue
                    (ia, ja), (ib, jb) = moa_images[(a, background)], moa_images[(b, background)]
                    subject = ja.masks.any(1) | jb.masks.any(1)
                    tally.add("swap_outside", metrics.outside_change(ia, ib, subject))
                    tally.add("swap_inside", metrics.inside_change(ia, ib, subject))


def identity_pairs(count: int) -> list[tuple[scenes.Identity, scenes.Identity]]:
    cats = [i for i in scenes.HELD_OUT if i.word == "cat"]
    dogs = [i for i in scenes.HELD_OUT if i.word == "dog"]
    return [(cats[k % len(cats)], dogs[(k + k // len(dogs)) % len(dogs)]) for k in range(count)]


def _score_pairs(tally: Tally, models, moa, judges, plan, seed: int) -> None:
    words = ("cat", "dog")
    for k, (cat, dog) in enumerate(identity_pairs(plan.pairs)):
        subjects = encode_subjects(models.vision, [cat, dog], plan.photos, seed)
        background = scenes.BACKGROUNDS[k % len(scenes.BACKGROUNDS)]
        cell = [s + 7919 * k for s in cell_seeds(words, background, seed, plan.pair_batch)]
        images, _ = sample(models, prompt(words, background), cell, MoAInput(moa, words, subjects), plan.sampling)
        judged = judges.judge(images, words)
        want = torch.tensor([scenes.HELD_OUT.index(cat), scenes.HELD_OUT.index(dog)])
        right = judged.identity == want
        swapped = (judged.identity[:, 0] == want[1]) | (judged.identity[:, 1] == want[0])
        tally.add("pair_both_right", right.all(1))
        tally.add("pair_swapped", swapped)


def _score_finetune(tally: Tally, models, judges, plan, seed: int, prior: dict, shown: dict) -> None:
    from .dreambooth import FineTune, fine_tune

    chosen = [scenes.HELD_OUT[0], scenes.HELD_OUT[len(scenes.HELD_OUT) // 2]][: plan.finetune_identities]
    for identity in chosen:
        tuned = fine_tune(models, identity, FineTune(steps=plan.finetune_steps), seed)
        index = scenes.HELD_OUT.index(identity)
        for background in scenes.BACKGROUNDS:
            text, cell = (
                prompt((identity.word,), background),
                cell_seeds((identity.word,), background, seed, plan.batch),
            )
            images, _ = sample(models, text, cell, settings=plan.sampling, model=tuned)
            base = prior[(identity.word, background)]
            _score_single(tally, "finetune", images, judges.judge(images, (identity.word,)), base,
                          judges.judge(base, (identity.word,)), index, background)  # fmt: skip
            shown[(identity, background)]["finetune"] = images


def _derived(figures: dict) -> None:
    if figures.get("outside_personal"):
        figures["outside_ratio"] = figures["outside_moa"] / figures["outside_personal"]


def held_out_router(world: Path, models: Any, weights: Any, seed: int) -> dict:
    """moa_train's held-out router metrics (prior weight on background and subject pixels) on
    generic scenes MoA never trained on, at timesteps 100, 500 and 900."""
    from comfyui_moa.moa_train.config import TrainConfig
    from comfyui_moa.moa_train.evaluate import evaluate

    from .moa import moa_settings, write_data

    folder = write_data(DATA_CACHE / f"held_out_{seed}", 50_000 + seed, 32)
    config = TrainConfig.from_dict(moa_settings(world, folder, folder / "unused", 1, seed))
    result = evaluate(config, models, weights.float(), folder, (100, 500, 900), torch.device("cpu"))
    return {"prior_background": result["all"]["prior_background"], "prior_subject": result["all"]["prior_subject"]}
