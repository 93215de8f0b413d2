"""Encode subject crops with a CLIP vision model loaded by ComfyUI's own loader."""

import torch
import torch.nn.functional as F

from ...moa_core import MoAError
from ...moa_core.subject import Subject, masked_subjects

CROP_SIZE = 224


def center_square(images: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """images [b, H, W, 3] -> [b, size, size, 3]: the centred square, resized."""
    side = min(images.shape[1:3])
    top, left = (images.shape[1] - side) // 2, (images.shape[2] - side) // 2
    return _resized(images[:, top : top + side, left : left + side].movedim(-1, 1), size)


def masked_squares(images: torch.Tensor, mask: torch.Tensor, input_name: str, size: int = CROP_SIZE) -> torch.Tensor:
    """images [b, H, W, 3] and their MASK -> [b, size, size, 3]: each subject cut out as training
    cuts them (moa_core.subject.masked_subjects), resized."""
    return torch.cat([_resized(square[None], size) for square in masked_subjects(images, mask, input_name)])


def _resized(squares: torch.Tensor, size: int) -> torch.Tensor:
    """[b, 3, s, s] -> [b, size, size, 3]"""
    return F.interpolate(squares, size=(size, size), mode="bicubic", antialias=True).movedim(1, -1).clamp(0, 1)


def encode_subject(clip_vision, crops: torch.Tensor, input_name: str) -> Subject:
    """One subject from its crops [k, 224, 224, 3]: the mean of their projected image embeddings
    (and of their penultimate hidden states, which IP-Adapter plus and full-face read)."""
    out = clip_vision.encode_image(crops, crop=True)
    embeds = getattr(out, "image_embeds", None)
    if embeds is None or embeds.ndim != 2:
        raise MoAError(
            f"{input_name}: this CLIP vision model gives no projected image embedding; load CLIP ViT-L/14 "
            "(e.g. clip-vit-large-patch14.safetensors in models/clip_vision) in the CLIPVisionLoader"
        )
    hidden = getattr(out, "penultimate_hidden_states", None)
    hidden = None if hidden is None or hidden.ndim != 3 else hidden.float().mean(dim=0).cpu()
    return Subject(embeds.float().mean(dim=0).cpu(), crops.cpu(), embeds.shape[-1], hidden)
