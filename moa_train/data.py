"""Training data: FastComposer's FFHQ-wild layout and a plain folder layout, read into samples.

FFHQ-wild (paper notes §7.5): `<root>/image_ids_<split>.txt` lists ids; each id has `<id[:5]>/<id>.jpg`,
`.json` {caption, segments: [{id, bbox, end, coco_label}]} and `.npy` (the panoptic id map). A
segment's subject word is the word of the caption ending at its `end`.

Folder: `x.jpg` (or .jpeg/.png/.webp), its caption `x.txt`, and one mask per subject word,
`x.<word>.png` (`x.<word>.<k>.png` for the word's k-th occurrence in the caption, from 1).

A bad record (missing mask, subject word not in its caption, unreadable file) raises DataError;
the dataset (samples.py) reports it and takes the next record.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comfyui_moa.moa_core.errors import DataError

from .images import read_mask, read_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Subject:
    word: str
    occurrence: int  # which occurrence of the word in the caption, from 0
    start: int  # character where that occurrence starts: subjects are ordered as in the text
    masks: tuple = ()  # mask files (folder layout) or segment ids (ffhq-wild) whose union is the subject


@dataclass(frozen=True)
class Record:
    key: str
    image: Path
    caption: str
    subjects: tuple[Subject, ...]
    segments: Path | None = None  # ffhq-wild: the panoptic id map


def word_starts(caption: str, word: str) -> list[int]:
    """Where `word` starts in `caption` as a whole word, case-insensitive (CLIP lowercases)."""
    pattern = r"(?<![\w'])" + re.escape(word) + r"(?![\w'])"
    return [m.start() for m in re.finditer(pattern, caption, flags=re.IGNORECASE)]


def word_ending_at(caption: str, end: int, key: str) -> tuple[str, int]:
    """(word, start) of the caption's word that ends at character `end`."""
    match = re.search(r"\w(?:[\w'-]*\w)?$", caption[: max(0, end)].rstrip())
    if not 0 < end <= len(caption) or match is None:
        raise DataError(f"{key}: a segment ends at character {end}, where the caption {caption!r} has no word")
    return match.group(0), match.start()


class FfhqWild:
    """FastComposer's FFHQ-wild files (mit-han-lab/ffhq-fastcomposer)."""

    def __init__(self, root: Path, split: str, object_types: tuple[str, ...]) -> None:
        ids_file = root / f"image_ids_{split}.txt"
        if not ids_file.is_file():
            raise DataError(
                f"[data] root {root}: no {ids_file.name}; point root at the unpacked ffhq_fastcomposer folder "
                '(the one holding image_ids_train.txt) or set layout = "folder"'
            )
        self.root, self.object_types = root, set(object_types)
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, index: int) -> Record:
        key = self.ids[index]
        folder = self.root / key[:5]
        try:
            info = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
            caption, segments = str(info["caption"]), list(info["segments"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: unreadable annotation {key}.json ({e})") from None
        by_span: dict[tuple[str, int], Subject] = {}
        for segment in segments:
            if not isinstance(segment, dict) or segment.get("coco_label") not in self.object_types:
                continue
            word, start = word_ending_at(caption, int(segment.get("end", -1)), key)
            starts = word_starts(caption, word)
            if start not in starts:
                raise DataError(f"{key}: the subject word {word!r} is not a whole word of the caption {caption!r}")
            occurrence = starts.index(start)
            span = (word.lower(), occurrence)
            # segments that end on the same word share its token: one subject, the union of their pixels
            old = by_span.get(span)
            masks = (old.masks if old else ()) + (int(segment["id"]),)
            by_span[span] = Subject(word, occurrence, start, masks)
        if not by_span:
            raise DataError(f"{key}: no segment labelled {' or '.join(sorted(self.object_types))}")
        subjects = tuple(sorted(by_span.values(), key=lambda s: s.start))
        return Record(key, folder / f"{key}.jpg", caption, subjects, folder / f"{key}.npy")


class FolderLayout:
    """x.jpg + x.txt + x.<word>.png per subject word."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"[data] root {root}: no such folder")
        self.root = root
        self.captions = sorted(root.glob("*.txt"))

    def __len__(self) -> int:
        return len(self.captions)

    def record(self, index: int) -> Record:
        caption_file = self.captions[index]
        key = caption_file.stem
        images = [caption_file.with_suffix(s) for s in IMAGE_SUFFIXES if caption_file.with_suffix(s).is_file()]
        if not images:
            raise DataError(f"{key}: no image {key}.jpg/.jpeg/.png/.webp beside {caption_file.name}")
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{key}: unreadable caption {caption_file.name} ({e})") from None
        subjects = [self._subject(key, caption, path) for path in sorted(self.root.glob(f"{glob_escape(key)}.*.png"))]
        if not subjects:
            raise DataError(f"{key}: no subject mask {key}.<word>.png beside {caption_file.name}")
        spans = [(s.word.lower(), s.occurrence) for s in subjects]
        if len(set(spans)) != len(spans):
            raise DataError(f"{key}: two masks name the same occurrence of a word; number them {key}.<word>.<k>.png")
        return Record(key, images[0], caption, tuple(sorted(subjects, key=lambda s: s.start)))

    @staticmethod
    def _subject(key: str, caption: str, path: Path) -> Subject:
        name = path.name[len(key) + 1 : -len(".png")]
        word, _, number = name.rpartition(".")
        if not (word and number.isdecimal() and int(number) >= 1):
            word, number = name, "1"
        starts = word_starts(caption, word)
        if len(starts) < int(number):
            found = "is not" if not starts else f"occurs {len(starts)} times"
            raise DataError(f"{key}: the subject word {word!r} of {path.name} {found} in the caption {caption!r}")
        return Subject(word, int(number) - 1, starts[int(number) - 1], (path,))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def read_record(record: Record) -> tuple[torch.Tensor, torch.Tensor]:
    """The record's image uint8 [3, H, W] and its subjects' masks bool [s, H, W]."""
    image = read_rgb(record.image)
    if record.segments is not None:
        try:
            ids = torch.from_numpy(np.load(record.segments, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError) as e:
            raise DataError(f"{record.key}: unreadable segment map {record.segments.name} ({e})") from None
        masks = [torch.isin(ids, torch.tensor(subject.masks)) for subject in record.subjects]
    else:
        masks = [torch.stack([read_mask(path) for path in subject.masks]).any(0) for subject in record.subjects]
    stacked = torch.stack(masks)
    if stacked.shape[-2:] != image.shape[-2:]:
        raise DataError(
            f"{record.key}: masks are {tuple(stacked.shape[-2:])} but the image is {tuple(image.shape[-2:])}"
        )
    empty = [s.word for s, m in zip(record.subjects, stacked, strict=True) if not bool(m.any())]
    if empty:
        raise DataError(f"{record.key}: the mask of {empty[0]!r} is empty")
    return image, stacked


def open_layout(layout: str, root: str | Path, split: str, object_types: tuple[str, ...]) -> FfhqWild | FolderLayout:
    root = Path(root)
    if layout == "ffhq-wild":
        return FfhqWild(root, split, object_types)
    return FolderLayout(root)
