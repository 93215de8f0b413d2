"""The world's held-out judges (judges.py) read for the evaluation: per image its background
class, and per subject word its mask (the segmenter) and its identity (judged on that mask alone,
so each subject of a two-subject image is judged by itself)."""

from dataclasses import dataclass
from pathlib import Path

import torch

from . import scenes
from .judges import Judges


@dataclass(frozen=True)
class Judged:
    background: torch.Tensor  # [b] index into scenes.BACKGROUNDS
    masks: torch.Tensor  # bool [b, s, 32, 32]: the segmenter's mask of each word asked for
    identity: torch.Tensor  # [b, s] index into scenes.HELD_OUT, judged on that word's mask
    attributes: torch.Tensor  # [b, s, 4] scenes.ATTRIBUTES indices (word, body, pattern, mark) on that mask


class WorldJudges:
    def __init__(self, folder: Path) -> None:
        self.judges = Judges.load(folder)

    def judge(self, images: torch.Tensor, words: tuple[str, ...]) -> Judged:
        """IMAGE [b, 32, 32, 3] in [0, 1] and the subject words its prompt names."""
        x = images.permute(0, 3, 1, 2).float()
        found = self.judges.subject_masks(x)
        masks = torch.stack([found[:, scenes.SUBJECT_WORDS.index(word)] for word in words], 1)
        identity = torch.stack([self.judges.identity(x, masks[:, k]) for k in range(len(words))], 1)
        attributes = torch.stack([self.judges.attributes(x, masks[:, k]) for k in range(len(words))], 1)
        return Judged(self.judges.background(x), masks, identity, attributes)
