"""Image handling for training samples: reading, the target transform, subject crops and their
augmentations (FastComposer's, paper notes §7.5), and per-sample seeding.

Every random choice of a sample comes from a seed derived from (run seed, step, global sample
index), so one process or many, resumed or not, every sample looks the same.
"""

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image, UnidentifiedImageError

from comfyui_moa.moa_core.errors import DataError
from comfyui_moa.moa_core.subject import mask_box, pad_square

BILINEAR = T.InterpolationMode.BILINEAR
NEAREST = T.InterpolationMode.NEAREST


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, step, sample index, purpose): stable across runs,
    processes and Python versions, unlike hash()."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator (which torchvision's transforms draw from) seeded for one sample,
    and restored afterwards so nothing else's randomness moves."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _read(path: Path, mode: str, what: str) -> np.ndarray:
    """An image file as a PIL `mode` array; an unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path.name}: unreadable {what} ({e})") from None


def read_rgb(path: Path) -> torch.Tensor:
    """An image file -> uint8 [3, H, W] (greyscale, palette and alpha images become RGB)."""
    return torch.from_numpy(_read(path, "RGB", "image").copy()).permute(2, 0, 1)


def read_mask(path: Path) -> torch.Tensor:
    """A mask image -> bool [H, W]: the subject is where the mask is brighter than mid-grey."""
    return torch.from_numpy(_read(path, "L", "mask") > 127)


def fit_square(image: torch.Tensor, masks: torch.Tensor, size: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FastComposer's target transform: image uint8 [3, H, W] and masks bool [s, H, W] -> image
    float [3, size, size] in [0, 1] and masks float [s, size, size].

    The shorter side is resized to `size`; a landscape image is centre-cropped, a portrait one is
    padded at the sides to a square (masks pad with background) and resized, so heads stay whole.
    """
    image = T.functional.resize(image, size, interpolation=BILINEAR, antialias=True)
    masks = T.functional.resize(masks.to(torch.uint8), size, interpolation=NEAREST)
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
    h, w = image.shape[-2:]
    if h > w:
        left = (h - w) // 2
        image = F.pad(image, (left, h - w - left))
        masks = F.pad(masks, (left, h - w - left))
        image = T.functional.resize(image, [size, size], interpolation=BILINEAR, antialias=True)
        masks = T.functional.resize(masks, [size, size], interpolation=NEAREST)
    else:
        left = (w - h) // 2
        image, masks = image[..., left : left + h], masks[..., left : left + h]
    return image.float() / 255.0, masks.float()


def subject_crop(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The subject alone: image uint8 [3, H, W], mask bool [H, W] -> uint8 [3, h, w], the pixels
    outside the mask replaced by uniform noise, cropped to the mask's bounding box."""
    top, bottom, left, right = mask_box(mask)
    noise = torch.randint(0, 256, image.shape, dtype=torch.uint8)
    return torch.where(mask, image, noise)[:, top:bottom, left:right]


def _zoom_in(crop: torch.Tensor) -> torch.Tensor:
    """Enlarge 1-2x and, for a portrait crop, keep its top square (the head)."""
    zoom = 1.0 + float(torch.rand(()))
    h, w = crop.shape[-2:]
    crop = T.functional.resize(crop, [int(zoom * h), int(zoom * w)], interpolation=BILINEAR, antialias=True)
    return crop[:, : crop.shape[-1]] if crop.shape[-2] > crop.shape[-1] else crop


_AUGMENT = T.Compose(
    [
        T.RandomApply([T.RandomAffine(degrees=30, interpolation=BILINEAR)], p=0.75),
        T.RandomApply([T.ColorJitter(0.5, 0.5, 0.5, 0.5)], p=0.5),
        T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
        T.RandomGrayscale(p=0.1),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ElasticTransform()], p=0.5),
    ]
)


def subject_image(crop: torch.Tensor, size: int, augment: bool) -> torch.Tensor:
    """A subject crop uint8 [3, h, w] -> the image encoder's input float [3, size, size] in [0, 1]:
    zoom-in (p 0.5), padding to a square, resize, then rotation, colour jitter, blur, greyscale,
    flip and elastic warp as FastComposer trains them (paper notes §7.5). Uses the global torch
    generator: call it inside `seeded`."""
    if augment and float(torch.rand(())) < 0.5:
        crop = _zoom_in(crop)
    crop = T.functional.resize(pad_square(crop), [size, size], interpolation=BILINEAR, antialias=True)
    if augment:
        crop = _AUGMENT(crop)
    return crop.float() / 255.0
