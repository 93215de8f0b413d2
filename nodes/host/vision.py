"""Encode subject crops with a CLIP vision model loaded by ComfyUI's own loader."""

import torch
import torch.nn.functional as F

from ...moa_core import MoAError
from ...moa_core.subject import Subject

CROP_SIZE = 224


def center_square(images: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """images [b, H, W, 3] -> [b, size, size, 3]: the centred square, resized."""
    side = min(images.shape[1:3])
    top, left = (images.shape[1] - side) // 2, (images.shape[2] - side) // 2
    square = images[:, top : top + side, left : left + side].movedim(-1, 1)
    return F.interpolate(square, size=(size, size), mode="bicubic", antialias=True).movedim(1, -1).clamp(0, 1)


def encode_subject(clip_vision, crops: torch.Tensor, input_name: str) -> Subject:
    """One subject from its crops [k, 224, 224, 3]: the mean of their projected image embeddings."""
    out = clip_vision.encode_image(crops, crop=True)
    embeds = getattr(out, "image_embeds", None)
    if embeds is None or embeds.ndim != 2:
        raise MoAError(
            f"{input_name}: this CLIP vision model gives no projected image embedding; load CLIP ViT-L/14 "
            "(e.g. clip-vit-large-patch14.safetensors in models/clip_vision) in the CLIPVisionLoader"
        )
    return Subject(embeds.float().mean(dim=0).cpu(), crops.cpu(), embeds.shape[-1])
