"""Records -> training samples and batches, in an order set by the run seed alone.

Global sample g belongs to step g // global_batch; process `rank` takes the slice of each step it
would take in a run of `world` processes. Which record g reads, its augmentations, its
conditioning dropout, its noise and its timestep all derive from (seed, step, g), so one process
and several see the same samples, and a resumed run sees what an uninterrupted one would.
"""

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Any, Protocol

import torch

from comfyui_moa.moa_core.errors import ConditioningError, DataError
from comfyui_moa.nodes.host.text import bind_subject_words

from .config import DataSettings
from .data import FfhqWild, FolderLayout, Record, read_record
from .images import derived_seed, fit_square, seeded, subject_crop, subject_image

logger = logging.getLogger(__name__)

WINDOW = 77  # tokens in one CLIP text window: a training batch shares one prompt length


@dataclass(frozen=True)
class Binding:
    tokens: Any  # what the text encoder encodes (ComfyUI's token dict)
    positions: tuple[tuple[int, ...], ...]  # per word: its token positions in the prompt
    length: int  # tokens in the encoded prompt


class Binder(Protocol):
    def __call__(self, caption: str, words: Sequence[str], occurrences: Sequence[int]) -> Binding: ...


class CaptionBinder:
    """Finds subject words through the text encoder's own tokenizer, as the nodes do
    (nodes/host/text.py). It keeps only the tokenizer, so DataLoader workers can take it."""

    def __init__(self, clip: Any) -> None:
        self.tokenizer = clip.tokenizer
        self.options = dict(getattr(clip, "tokenizer_options", {}) or {})

    def tokenize(self, text: str) -> dict:
        """What comfy.sd.CLIP.tokenize does, on the tokenizer alone."""
        return self.tokenizer.tokenize_with_weights(text, False, tokenizer_options=self.options)

    def __call__(self, caption: str, words: Sequence[str], occurrences: Sequence[int]) -> Binding:
        if not caption:  # an unconditioned sample: the empty prompt, as the sampler's negative
            tokens = self.tokenize("")
            return Binding(tokens, (), sum(len(window) for window in next(iter(tokens.values()))))
        # captions are literal text: ComfyUI would read "(...)" as prompt weighting
        literal = caption.replace("(", "\\(").replace(")", "\\)")
        try:
            bound = bind_subject_words(self, literal, list(words), ("caption", "subject word"), list(occurrences))
        except ConditioningError as e:
            raise DataError(f"caption {caption!r}: {e}") from None
        return Binding(bound.tokens, tuple(tuple(p) for p in bound.positions), bound.prompt_length)


@dataclass(frozen=True)
class Example:
    index: int  # global sample index
    key: str
    image: torch.Tensor  # [3, R, R] in [0, 1]
    masks: torch.Tensor  # [s, R, R], every chosen subject
    crops: torch.Tensor  # [c, 3, S, S] in [0, 1], the subjects that keep their image
    conditioned: tuple[int, ...]  # for each crop, its subject (index into masks)
    binding: Binding | None
    noise_seed: int
    timestep: float  # in [0, 1): the fraction of the noise schedule
    skipped: int  # bad records passed over to reach this one


@dataclass(frozen=True)
class Batch:
    indices: torch.Tensor  # [b]
    images: torch.Tensor  # [b, 3, R, R]
    masks: torch.Tensor  # [b, s, R, R], zero for absent subjects
    crops: torch.Tensor  # [c, 3, S, S]
    crop_rows: torch.Tensor  # [c]: batch row of each crop
    crop_subjects: torch.Tensor  # [c]: its subject in that row
    positions: torch.Tensor  # [b, p]: token positions of the subject words
    subjects: torch.Tensor  # [b, p]: the subject each position carries, -1 unused
    tokens: tuple  # per row, what the text encoder encodes
    noise_seeds: torch.Tensor  # [b]
    timesteps: torch.Tensor  # [b] in [0, 1)
    skipped: int

    def to(self, device: torch.device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Batch(**moved)


class TrainingSamples(torch.utils.data.Dataset):
    """Global sample index -> Example. Bad records are reported once, counted and replaced by the
    next record of the epoch's order."""

    def __init__(
        self, layout: FfhqWild | FolderLayout, settings: DataSettings, seed: int, global_batch: int, binder: Binder
    ) -> None:
        if len(layout) == 0:
            raise DataError(f"[data] root: no training samples found for layout {settings.layout!r}")
        self.layout, self.settings, self.seed, self.global_batch, self.binder = (
            layout, settings, seed, global_batch, binder,
        )  # fmt: skip
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, index: int) -> Example:
        step = index // self.global_batch
        epoch, position = divmod(index, len(self.layout))
        order = _epoch_order(len(self.layout), self.seed, epoch)
        return self._first_good(
            (int(order[(position + k) % len(order)]) for k in range(len(order))),
            lambda record: self._example(record, index, derived_seed(self.seed, step, index, "sample"), True),
        )

    def fixed_example(self, record_index: int, timestep: float, seed: int = 0) -> Example:
        """Record `record_index` (or the next good one) as it is: no augmentation, no dropout, every
        subject conditioned (previews, held-out evaluation)."""
        n = len(self.layout)
        candidates = ((record_index + k) % n for k in range(n))
        example = self._first_good(candidates, lambda record: self._example(record, -1, seed, False))
        return replace(example, timestep=timestep)

    def _first_good(self, candidates: Iterator[int], make: Any) -> Example:
        skipped = 0
        for candidate in candidates:
            if candidate in self.bad:
                skipped += 1
                continue
            try:
                example = make(self.layout.record(candidate))
            except DataError as e:
                logger.warning("skipping a training sample: %s", e)
                self.bad.add(candidate)
                skipped += 1
                continue
            return replace(example, skipped=skipped)
        raise DataError(f"[data] root: none of the {len(self.layout)} records is readable (see the warnings above)")

    def _example(self, record: Record, index: int, seed: int, train: bool) -> Example:
        settings = self.settings
        image, masks = read_record(record)
        with seeded(seed):
            chosen = list(range(len(record.subjects)))
            if len(chosen) > settings.max_subjects:
                chosen = sorted(torch.randperm(len(chosen))[: settings.max_subjects].tolist())
            unconditioned = train and float(torch.rand(())) < settings.uncondition_prob
            keep = [
                not unconditioned and (not train or float(torch.rand(())) < settings.subject_keep_prob) for _ in chosen
            ]
            flip = train and bool(torch.rand(()) < 0.5)
            crops = [
                subject_image(subject_crop(image, masks[i]), settings.subject_resolution, train and settings.augment)
                for i, kept in zip(chosen, keep, strict=True)
                if kept
            ]
            noise_seed, timestep = int(torch.randint(0, 2**62, ())), float(torch.rand(()))
        target, target_masks = fit_square(image, masks[chosen], settings.resolution, flip)
        conditioned = tuple(j for j, kept in enumerate(keep) if kept)
        subjects = [record.subjects[chosen[j]] for j in conditioned]
        caption = "" if unconditioned else record.caption
        binding = self.binder(caption, [s.word for s in subjects], [s.occurrence for s in subjects])
        if binding.length != WINDOW:
            raise DataError(f"{record.key}: the caption is longer than one 77-token window; shorten it")
        crops_tensor = torch.stack(crops) if crops else torch.zeros(0, 3, *(settings.subject_resolution,) * 2)
        return Example(
            index, record.key, target, target_masks, crops_tensor, conditioned, binding, noise_seed, timestep, 0
        )


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))


class StepBatches(torch.utils.data.Sampler):
    """This process's micro-batches of global sample indices, from step `start` to `steps`."""

    def __init__(self, start: int, steps: int, batch: int, accum: int, rank: int, world: int) -> None:
        self.start, self.steps, self.batch, self.accum, self.rank, self.world = start, steps, batch, accum, rank, world

    @property
    def global_batch(self) -> int:
        return self.batch * self.accum * self.world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            for micro in range(self.accum):
                first = step * self.global_batch + (micro * self.world + self.rank) * self.batch
                yield list(range(first, first + self.batch))

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum


def collate(examples: Sequence[Example]) -> Batch:
    b = len(examples)
    subjects = max(1, max(len(e.masks) for e in examples))
    masks = torch.zeros(b, subjects, *examples[0].image.shape[-2:])
    for row, example in enumerate(examples):
        masks[row, : len(example.masks)] = example.masks
    slots = [
        [(p, subject) for subject, ps in zip(e.conditioned, e.binding.positions, strict=True) for p in ps]
        for e in examples
    ]
    width = max(1, max(len(s) for s in slots))
    positions = torch.zeros(b, width, dtype=torch.long)
    subject_ids = torch.full((b, width), -1, dtype=torch.long)
    for row, row_slots in enumerate(slots):
        if row_slots:
            positions[row, : len(row_slots)] = torch.tensor([p for p, _ in row_slots])
            subject_ids[row, : len(row_slots)] = torch.tensor([s for _, s in row_slots])
    crop_rows = [row for row, e in enumerate(examples) for _ in e.conditioned]
    return Batch(
        indices=torch.tensor([e.index for e in examples]),
        images=torch.stack([e.image for e in examples]),
        masks=masks,
        crops=torch.cat([e.crops for e in examples]),
        crop_rows=torch.tensor(crop_rows, dtype=torch.long),
        crop_subjects=torch.tensor([s for e in examples for s in e.conditioned], dtype=torch.long),
        positions=positions,
        subjects=subject_ids,
        tokens=tuple(e.binding.tokens for e in examples),
        noise_seeds=torch.tensor([e.noise_seed for e in examples]),
        timesteps=torch.tensor([e.timestep for e in examples]),
        skipped=sum(e.skipped for e in examples),
    )
