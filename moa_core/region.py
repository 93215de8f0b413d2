"""Where subjects may appear: a mask from the user, resized to the grid of every UNet level.

The region multiplies the router's personal weight, so 0 keeps the prior exactly and 1 leaves the
router free. It is drawn at any resolution; each attention layer reads it at its own grid.
"""

import torch
import torch.nn.functional as F

from .errors import OptionsError


def check_region(mask: torch.Tensor, input_name: str) -> torch.Tensor:
    """A user's mask [H, W] (or a ComfyUI MASK [1, H, W]) -> float32 [H, W] on the CPU, checked."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise OptionsError(
            f"{input_name}: expected one mask [height, width], got shape {list(mask.shape)}; "
            "pass a single MASK (one image, not a batch)"
        )
    mask = mask.detach().float().cpu()
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
        raise OptionsError(
            f"{input_name}: mask values must lie in [0, 1] (found {float(mask.min()):.3g} to "
            f"{float(mask.max()):.3g}); use a MASK, or normalise the image you made it from"
        )
    return mask


def region_at(region: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """region [H, W] at a grid of hw = (h, w) pixels -> [h*w, 1], bilinear at each grid pixel's
    centre. Without antialiasing a region edge stays as sharp at coarse levels as the grid allows
    (a square over a quarter of the image is a quarter of every level, not more)."""
    if tuple(region.shape) == tuple(hw):
        return region.reshape(-1, 1)
    resized = F.interpolate(region[None, None], size=hw, mode="bilinear", align_corners=False)
    return resized.clamp_(0.0, 1.0).reshape(-1, 1)


def region_levels(
    region: torch.Tensor, latent_hw: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> dict[int, torch.Tensor]:
    """The region at every UNet level of a latent of latent_hw: pixel count n -> [n, 1].

    Levels halve with stride-2 convolutions, odd sizes rounding up (as helpers.seq_to_hw).
    """
    region = region.to(device)
    levels = {}
    h, w = latent_hw
    while True:
        levels[h * w] = region_at(region, (h, w)).to(dtype)
        if h * w == 1:
            return levels
        h, w = -(-h // 2), -(-w // 2)
