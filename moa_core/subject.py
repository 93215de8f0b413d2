"""Subjects: what the subject encoder makes of reference images, and how images are prepared."""

from dataclasses import dataclass

import torch

from .errors import MoAError


@dataclass(frozen=True)
class Subject:
    """One subject: its image embedding and the crop(s) it was encoded from."""

    embedding: torch.Tensor  # [e], mean over the subject's reference images
    crops: torch.Tensor  # [k, 224, 224, 3] what the image encoder saw, for previews
    encoder_dim: int  # width of the image encoder's embedding


def to_rgb(image: torch.Tensor, input_name: str) -> torch.Tensor:
    """ComfyUI IMAGE [b, H, W, c] with c = 1 (grey), 3 or 4 (RGBA, alpha dropped) -> [b, H, W, 3]."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[1:3]) < 8:
        raise MoAError(f"{input_name}: expected an IMAGE [batch, height, width, channels], got {list(image.shape)}")
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def blank_background(image: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Replace pixels outside mask [b or 1, H', W'] (resized to the image) of image [b, H, W, 3]
    with uniform noise, as the subject crops were during training."""
    if mask.ndim == 2:
        mask = mask[None]
    mask = torch.nn.functional.interpolate(mask[:, None].float(), size=image.shape[1:3], mode="bilinear")[:, 0]
    mask = mask.clamp(0, 1).expand(image.shape[0], -1, -1)[..., None].to(image)
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)).to(image)
    return image * mask + noise * (1.0 - mask)


def blend_subjects(a: Subject, b: Subject, factor: float) -> Subject:
    """The subject `factor` of the way from a to b (0: a, 1: b): linear in embedding space."""
    if a.encoder_dim != b.encoder_dim:
        raise MoAError(
            f"subjects encoded with different image encoders ({a.encoder_dim}-d and {b.encoder_dim}-d) "
            "cannot be blended; encode both with the same CLIP vision model"
        )
    embedding = torch.lerp(a.embedding.float(), b.embedding.float(), factor)
    crops = a.crops if factor < 0.5 else b.crops
    return Subject(embedding, crops, a.encoder_dim)
