"""Sampling the small world as a ComfyUI graph does: the pack's nodes (MoA Subject, MoA Apply) on
the world's models, then comfy.sample.sample, the sampler behind KSampler.

Images are IMAGE [b, 32, 32, 3] in [0, 1]. Row i of a call is drawn from the noise of seed i
(sampling.seed_noise: what KSampler draws for a one-image batch of that seed), so the prior, MoA
and every ablation at the same seeds compare pixel for pixel.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import comfy.sample
import torch

from comfyui_moa.moa_core import RouterMode, RouterRecord
from comfyui_moa.nodes.apply import MoAApply
from comfyui_moa.nodes.subjects import LARGEST, MoASubject

from . import scenes
from .sampling import SampleSettings, seed_noise


def subject_photos(identity: scenes.Identity, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` photos of `identity` (scenes.photo): IMAGE [k, 32, 32, 3] and its MASK [k, 32, 32]."""
    renders = [scenes.photo(identity, seed * 1000 + i)[1] for i in range(count)]
    images = torch.stack([r.image.permute(1, 2, 0) for r in renders])
    masks = torch.stack([r.subject_masks[0].float() for r in renders])
    return images, masks


def encode_subjects(vision: Any, identities: Sequence[scenes.Identity], photos: int = 3, seed: int = 0) -> tuple:
    """MOA_SUBJECTS for `identities`, in order, as MoA Subject makes them from masked photos
    (the photos' embeddings averaged per subject)."""
    subjects: tuple = ()
    for identity in identities:
        images, masks = subject_photos(identity, photos, seed)
        subjects, _ = MoASubject.encode(images, vision, LARGEST, 0.3, mask=masks, subjects=subjects)
    return subjects


def encode_text(clip: Any, text: str) -> list:
    """CLIPTextEncode's CONDITIONING."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@dataclass(frozen=True)
class MoAInput:
    """What MoA Apply gets besides the model and prompt."""

    weights: Any  # MOA_WEIGHTS: a ModelPatcher of MoAWeights
    words: tuple[str, ...]
    subjects: tuple  # MOA_SUBJECTS, one per word
    router: RouterMode = RouterMode.LEARNED
    strength: float = 1.0


@torch.no_grad()
def sample(
    models: Any,
    text: str,
    seeds: Sequence[int],
    moa: MoAInput | None = None,
    settings: SampleSettings | None = None,
    model: Any = None,
) -> tuple[torch.Tensor, RouterRecord | None]:
    """Images of `text`, one per seed, in one sampler call: the prior's (`moa` None) or MoA's
    through MoA Apply, with its router record. `model` replaces the world's prior (the fine-tune)."""
    settings = settings or SampleSettings()
    model = model or models.model
    record = None
    if moa is None:
        positive = encode_text(models.clip, text)
    else:
        model, positive, record = MoAApply.apply(
            model, moa.weights, models.clip, text, ", ".join(moa.words), moa.subjects,
            moa.strength, 0.0, 1.0, router=moa.router.value,
        )  # fmt: skip
    negative = encode_text(models.clip, "")
    noise = seed_noise(list(seeds))
    out = comfy.sample.sample(
        model, noise, settings.steps, settings.cfg, settings.sampler, settings.scheduler, positive, negative,
        torch.zeros_like(noise), seed=int(seeds[0]), disable_pbar=True,
    )  # fmt: skip
    return models.vae.decode(out).float().cpu().clamp(0, 1), record
