"""The prior's quality as the judges see it: background and object accuracy of its samples
against the same judges' accuracy on real world images of the same prompts.

Call `moa_pack.use_host(cpu=...)` before importing this module.

`prior_quality(world, judges, count, seed, settings) -> dict`: `count` prompts drawn from the world
(one generic subject, 0-1 objects, every background), each sampled once through ComfyUI's sampler
(sampling.sample_images) and rendered once for real from the same scene; per set, the share whose
judged background is the prompt's, whose judged subject words are the prompt's, and whose judged
object classes (ball/box present) are the prompt's.
"""

import torch

from . import scenes as S
from .judges import Judges
from .sampling import SampleSettings, sample_images


def _scores(judges: Judges, images: torch.Tensor, scenes: list[S.Scene]) -> dict:
    background = torch.tensor([S.BACKGROUNDS.index(s.background) for s in scenes])
    words = torch.zeros(len(scenes), len(S.SUBJECT_WORDS), dtype=torch.bool)
    classes = torch.zeros(len(scenes), len(S.OBJECT_CLASSES), dtype=torch.bool)
    for i, s in enumerate(scenes):
        for c in s.creatures:
            words[i, S.SUBJECT_WORDS.index(c.identity.word)] = True
        for item in s.items:
            classes[i, S.OBJECT_CLASSES.index(item.kind)] = True
    found = judges.objects(images).any(2)
    return {
        "background": float((judges.background(images) == background).float().mean()),
        "subject_word": float((judges.words(images) == words).all(1).float().mean()),
        "object_class": float((found == classes).all(1).float().mean()),
    }


def prior_quality(world, judges: Judges, count: int = 64, seed: int = 777, settings: SampleSettings | None = None):
    scenes = [S.sample_scene(S.scene_seed(seed, i) + 1, n_subjects=1, n_objects=i % 2) for i in range(count)]
    real = torch.stack([S.render(s).image for s in scenes])
    samples = sample_images(world.model, world.clip, [s.caption for s in scenes], list(range(count)), settings)
    return {
        "prompts": count,
        "real": _scores(judges, real, scenes),
        "prior": _scores(judges, samples.movedim(-1, 1), scenes),
    }, samples
