"""A small synthetic subject dataset in the trainer's plain folder layout, generated at test time.

Subjects are textured shapes ("ball": a striped disc, "box": a checkered square) with exact masks,
on smooth backgrounds of varied colours; captions name each subject by its word. Every image is
x.jpg with x.txt and one x.<word>.png (x.<word>.<k>.png for a repeated word) per subject.
"""

import math
from pathlib import Path

import torch
from PIL import Image

SHAPES = ("ball", "box")
PLACES = ("on a table", "in a garden", "on the floor", "by a wall", "on the beach", "in a room")


def _muted(generator: torch.Generator) -> torch.Tensor:
    """A greyish colour [3, 1, 1]: a grey level with a slight tint."""
    grey = float(torch.rand((), generator=generator)) * 0.6 + 0.2
    return (grey + (torch.rand(3, 1, 1, generator=generator) - 0.5) * 0.2).clamp(0, 1)


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    """[3, size, size] in [0, 1]: a gradient between two muted colours plus soft blobs."""
    low, high = _muted(generator), _muted(generator)
    angle = float(torch.rand((), generator=generator)) * 2 * math.pi
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ramp = ((xs * math.cos(angle) + ys * math.sin(angle)) + 1.5) / 3
    blobs = torch.rand(3, 4, 4, generator=generator)[None]
    blobs = torch.nn.functional.interpolate(blobs, size=(size, size), mode="bicubic", align_corners=False)[0]
    return (low + (high - low) * ramp + 0.1 * (blobs - 0.5)).clamp(0, 1)


PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.95, 0.85, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2], [0.9, 0.2, 0.8]])
"""Saturated colours: the subjects stand out from the muted backgrounds even at the latent's 1/8 scale."""


def _subject(shape: str, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured shape: (mask bool [size, size], texture [3, size, size]), stripes and checks
    coarse enough (1/10 of the image) to survive the VAE's 8x downscale."""
    radius = float(torch.randint(size // 6, size // 4, (), generator=generator))
    cy, cx = (float(v) for v in torch.randint(int(radius), int(size - radius), (2,), generator=generator))
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    period = size / 10
    if shape == "ball":
        mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        pattern = (((xs + ys) / period).floor() % 2).bool()  # diagonal stripes
    else:
        mask = ((ys - cy).abs() <= radius * 0.85) & ((xs - cx).abs() <= radius * 0.85)
        pattern = (((xs // period) + (ys // period)) % 2).bool()  # a checkerboard
    first, second = torch.randperm(len(PALETTE), generator=generator)[:2]
    return mask, torch.where(pattern, PALETTE[first][:, None, None], PALETTE[second][:, None, None])


def write_sample(folder: Path, key: str, size: int, generator: torch.Generator) -> None:
    image = _background(size, generator)
    count = 1 + int(torch.randint(0, 2, (), generator=generator))
    shapes = [SHAPES[int(torch.randint(0, len(SHAPES), (), generator=generator))] for _ in range(count)]
    masks = []
    for shape in shapes:
        mask, texture = _subject(shape, size, generator)
        image = torch.where(mask, texture, image)
        masks = [m & ~mask for m in masks] + [mask]  # a later subject hides what it covers
    place = PLACES[int(torch.randint(0, len(PLACES), (), generator=generator))]
    words = " and ".join(f"a {shape}" for shape in shapes)
    (folder / f"{key}.txt").write_text(f"a photo of {words} {place}")
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{key}.jpg", quality=95)
    for shape in set(shapes):
        same = [m for s, m in zip(shapes, masks, strict=True) if s == shape]
        for k, mask in enumerate(same, start=1):
            name = f"{key}.{shape}.png" if len(same) == 1 else f"{key}.{shape}.{k}.png"
            Image.fromarray((mask.numpy() * 255).astype("uint8")).save(folder / name)


def write_dataset(folder: Path, count: int, size: int = 128, seed: int = 0, bad: bool = False) -> Path:
    """`count` samples in `folder`; with `bad`, two broken ones too (a mask whose word is not in
    the caption, and an image without masks) that the trainer must report and skip."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        write_sample(folder, f"s{seed}_{i:04d}", size, generator)
    if bad:
        write_sample(folder, "zz_wrong_word", size, generator)
        for mask in folder.glob("zz_wrong_word.*.png"):
            mask.rename(folder / "zz_wrong_word.giraffe.png")
        write_sample(folder, "zz_no_mask", size, generator)
        for mask in folder.glob("zz_no_mask.*.png"):
            mask.unlink()
    return folder
