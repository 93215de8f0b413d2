"""The router viewer's data: each sampling step's mean r1 per layer group, as tiles of one atlas.

The web viewer (web/moa_router_viewer.js) draws one tile at a time over the generated image, so an
artist can scrub the steps and layer groups of a finished run without running the graph again. One
grayscale atlas per layer group keeps a run to a handful of small PNGs: tiles are at most TILE_SIDE
pixels on their longest side (the latent's own size for SD1.5 at 512 px) and 8-bit.

Tile k of an atlas (k = image * steps + step) sits at row k // columns, column k % columns.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from .record import RouterRecord
from .unet_layout import LAYER_GROUPS, layers_in_group

TILE_SIDE = 64
PICTURE_SIDE = 384  # the decoded images the tiles are drawn over; the viewer's canvas is this size


def fit(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(H, W) scaled down so that its longest side is at most `longest`, aspect kept; never scaled up."""
    height, width = size
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def group_step_maps(record: RouterRecord, size: tuple[int, int], batch: int) -> dict[str, torch.Tensor]:
    """Mean r1 over the layers of every layer group that has layers: group -> [b, T, H, W] float32 in
    [0, 1], one map per image and sampling step, resized to `size` (H, W) as RouterRecord.stack does.

    A step where MoA did not act has no maps and is 0 (the prior painted it).
    """
    groups = {group: layers_in_group(record.layer_paths, group) for group in LAYER_GROUPS}
    groups = {group: layers for group, layers in groups.items() if layers}
    steps = len(record.sigmas) - 1
    every_layer = list(range(len(record.layer_paths)))
    out = {group: torch.zeros(batch, steps, *size) for group in groups}
    for step in range(steps):  # one step at a time: all steps of all layers at once can take 100s of MB
        maps = record.stack(size, every_layer, [step], batch)[0]  # [L, b, H, W]
        for group, layers in groups.items():
            out[group][:, step] = maps[layers].mean(dim=0)
    return out


def atlas_columns(count: int) -> int:
    """Tiles per atlas row: near square, so long schedules stay far from image size limits."""
    return max(1, math.ceil(math.sqrt(count)))


def pack(tiles: torch.Tensor, columns: int) -> torch.Tensor:
    """tiles [n, h, w, ...] -> atlas [rows * h, columns * w, ...], tile k at row k // columns and
    column k % columns; places after the last tile are 0."""
    rows = math.ceil(tiles.shape[0] / columns)
    padded = tiles.new_zeros(rows * columns, *tiles.shape[1:])
    padded[: tiles.shape[0]] = tiles
    return rearrange(padded, "(r c) y x ... -> (r y) (c x) ...", c=columns)


def to_bytes(values: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8 0..255 (rounded), as a PNG stores them."""
    return (values.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def map_atlases(maps: dict[str, torch.Tensor], columns: int) -> dict[str, torch.Tensor]:
    """group_step_maps' [b, T, H, W] per group -> uint8 atlases [rows * H, columns * W] of b * T tiles."""
    return {group: to_bytes(pack(m.flatten(0, 1), columns)) for group, m in maps.items()}


def picture_atlas(images: torch.Tensor, size: tuple[int, int], columns: int) -> torch.Tensor:
    """IMAGE [b, H, W, 3] -> uint8 atlas of the images resized to `size` (h, w), one tile per image."""
    pictures = images.float().movedim(-1, 1)
    if tuple(pictures.shape[-2:]) != tuple(size):
        pictures = F.interpolate(pictures, size=size, mode="bilinear", align_corners=False, antialias=True)
    return to_bytes(pack(pictures.movedim(1, -1), columns))


def acted_steps(record: RouterRecord) -> list[bool]:
    """Per sampling step: did MoA act (has the step any recorded map)? The viewer says so on the others."""
    recorded = set(record.steps())
    return [step in recorded for step in range(len(record.sigmas) - 1)]
