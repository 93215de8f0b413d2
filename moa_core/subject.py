"""Subjects: what the subject encoder makes of reference images, and how images are prepared."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import MoAError


@dataclass(frozen=True)
class Subject:
    """One subject: its image embedding and the crop(s) it was encoded from."""

    embedding: torch.Tensor  # [e], mean over the subject's reference images
    crops: torch.Tensor  # [k, 224, 224, 3] what the image encoder saw, for previews
    encoder_dim: int  # width of the image encoder's embedding
    hidden_states: torch.Tensor | None = None  # [257, e'] penultimate layer, mean over images (IP-Adapter plus)


def to_rgb(image: torch.Tensor, input_name: str) -> torch.Tensor:
    """ComfyUI IMAGE [b, H, W, c] with c = 1 (grey), 3 or 4 (RGBA, alpha dropped) -> [b, H, W, 3]."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[1:3]) < 8:
        raise MoAError(f"{input_name}: expected an IMAGE [batch, height, width, channels], got {list(image.shape)}")
    if image.shape[-1] == 1:
        return image.expand(-1, -1, -1, 3)
    return image[..., :3]


def fit_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """MASK [b or 1, H', W'] or [H', W'] -> [b, H, W] in [0, 1] at the size of image [b, H, W, 3]."""
    if mask.ndim == 2:
        mask = mask[None]
    mask = F.interpolate(mask[:, None].float(), size=image.shape[1:3], mode="bilinear")[:, 0]
    return mask.clamp(0, 1).expand(image.shape[0], -1, -1).to(image)


def blank_background(image: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Replace pixels outside mask [b or 1, H', W'] (resized to the image) of image [b, H, W, 3]
    with uniform noise, as the subject crops were during training."""
    mask = fit_mask(mask, image)[..., None]
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)).to(image)
    return image * mask + noise * (1.0 - mask)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the True pixels of mask [H, W], or None for an empty mask."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pad_square(image: torch.Tensor) -> torch.Tensor:
    """[..., h, w] -> [..., s, s] with s = max(h, w): zeros (black) on both short sides, the image
    centred; how training squares its subject crops, so the subject stays whole."""
    h, w = image.shape[-2:]
    if h > w:
        return F.pad(image, ((h - w) // 2, h - w - (h - w) // 2))
    return F.pad(image, (0, 0, (w - h) // 2, w - h - (w - h) // 2))


def masked_subjects(images: torch.Tensor, mask: torch.Tensor, input_name: str) -> list[torch.Tensor]:
    """Subject photos as training shows its subjects to the image encoder: images [b, H, W, 3] and
    their MASK -> per image [3, s, s], blanked outside the mask (`blank_background`), cut to the
    mask's box and padded to a square."""
    blanked, masks = blank_background(images, mask), fit_mask(mask, images)
    squares = []
    for i, (image, inside) in enumerate(zip(blanked, masks, strict=True)):
        box = mask_box(inside > 0.5)
        if box is None:
            which = f" for image {i + 1}" if len(images) > 1 else ""
            raise MoAError(f"{input_name}: the mask is empty{which}; paint the subject white, or disconnect the mask")
        top, bottom, left, right = box
        squares.append(pad_square(image[top:bottom, left:right].movedim(-1, 0)))
    return squares


def blend_subjects(a: Subject, b: Subject, factor: float) -> Subject:
    """The subject `factor` of the way from a to b (0: a, 1: b): linear in embedding space."""
    if a.encoder_dim != b.encoder_dim:
        raise MoAError(
            f"subjects encoded with different image encoders ({a.encoder_dim}-d and {b.encoder_dim}-d) "
            "cannot be blended; encode both with the same CLIP vision model"
        )
    embedding = torch.lerp(a.embedding.float(), b.embedding.float(), factor)
    crops = a.crops if factor < 0.5 else b.crops
    hidden = None
    if a.hidden_states is not None and b.hidden_states is not None:
        hidden = torch.lerp(a.hidden_states.float(), b.hidden_states.float(), factor)
    return Subject(embedding, crops, a.encoder_dim, hidden)
