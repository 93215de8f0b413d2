"""Pictures of router maps: heatmaps, overlays on the generated image, layer x timestep grids.

Maps are r1 in [0, 1] (0: the prior painted the pixel, 1: the personal expert). Images follow
ComfyUI's IMAGE layout [b, H, W, 3], floats in [0, 1].
"""

import torch
import torch.nn.functional as F

# Dark blue for the prior, through violet and orange, to pale yellow for the personal expert.
# The one home of these colours: the web viewer receives them through colormap_stops().
_ANCHORS = torch.tensor([0.0, 0.35, 0.7, 1.0])
_COLOURS = torch.tensor(
    [
        [0.05, 0.03, 0.20],
        [0.45, 0.10, 0.55],
        [0.95, 0.45, 0.15],
        [1.00, 0.95, 0.35],
    ]
)


OVERLAY_ALPHA = 0.6  # how much of the heatmap covers the image where r1 is 1


def colormap_stops() -> dict[str, list]:
    """The colormap as plain lists, for the web viewer: anchors [k] in [0, 1], colours [k][3] in
    [0, 1], and the overlay's alpha."""
    return {"anchors": _ANCHORS.tolist(), "colours": _COLOURS.tolist(), "alpha": OVERLAY_ALPHA}


def colormap(values: torch.Tensor) -> torch.Tensor:
    """values [...] in [0, 1] -> RGB [..., 3], piecewise linear between the anchor colours."""
    v = values.float().clamp(0.0, 1.0)
    anchors, colours = _ANCHORS.to(v.device), _COLOURS.to(v.device)
    upper = torch.searchsorted(anchors, v.contiguous(), right=False).clamp(1, len(anchors) - 1)
    lo, hi = anchors[upper - 1], anchors[upper]
    frac = ((v - lo) / (hi - lo))[..., None]
    return colours[upper - 1] * (1.0 - frac) + colours[upper] * frac


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """maps [m, h, w] -> [m, H, W], bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return F.interpolate(maps.float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def heatmap(maps: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """maps [m, h, w] -> IMAGE [m, H, W, 3] (size (H, W), default the maps' own)."""
    return colormap(resize_maps(maps, size or tuple(maps.shape[-2:])))


def overlay(image: torch.Tensor, maps: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> torch.Tensor:
    """The heatmap of maps [b, h, w] over image [b, H, W, 3]; where r1 is 0 the image shows as is.

    One map for a batch of images is used for all of them.
    """
    b, height, width, _ = image.shape
    maps = resize_maps(maps, (height, width)).to(image.device)
    if maps.shape[0] != b:
        maps = maps.expand(b, -1, -1)
    weight = (alpha * maps)[..., None]
    return image * (1.0 - weight) + colormap(maps) * weight


def grid(maps: torch.Tensor, tile: int = 64, gap: int = 2) -> torch.Tensor:
    """maps [rows, cols, h, w] (rows: layers, cols: timesteps) -> one IMAGE [1, H, W, 3] of
    `tile`-pixel heatmaps with `gap` white pixels between them."""
    rows, cols = maps.shape[:2]
    tiles = heatmap(maps.reshape(rows * cols, *maps.shape[2:]), (tile, tile)).reshape(rows, cols, tile, tile, 3)
    step = tile + gap
    out = torch.ones(rows * step - gap, cols * step - gap, 3)
    for i in range(rows):
        for j in range(cols):
            out[i * step : i * step + tile, j * step : j * step + tile] = tiles[i, j]
    return out[None]
