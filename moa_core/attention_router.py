"""A router read from attention: where each subject's word is looked at, no training needed.

Per subject, the cross-attention probability of its word's tokens (softmax over all text tokens,
cond rows, mean over heads), from the layers where words localise best (by default the grid at a
quarter of the latent's: 16x16 at 512 px, as prompt-to-prompt's LocalBlend reads). The maps add
up over the steps so far and the earlier layers of the current model call (no second UNet pass),
are smoothed, and normalised by their maximum to [0, 1]. A subject's weight is a soft threshold
of its map, and competing subjects split the pixels: a pixel goes to the subject whose map is
highest there, the others get exactly 0, so no pixel carries two identities.

What it cannot know without training: only where the base model draws the word (it reads the
prior's attention), not the subject's true outline; words the model does not localise (e.g.
"person" in a crowd) give diffuse maps; the first steps' maps are noise, hence the warm-up.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import OptionsError


@dataclass(frozen=True)
class AttentionRouterConfig:
    downscale: int = 4  # read the layers whose grid is the latent's / downscale (16x16 at 512 px), or the deepest
    # cross-attention level where a model has none that deep
    warmup: float = 0.2  # fraction of the schedule before the router acts (the prior paints until then)
    threshold: float = 0.3  # normalised maps below this give weight 0 ...
    softness: float = 0.2  # ... and reach 1 this far above it
    blur: float = 1.0  # Gaussian sigma, in pixels of the read grid

    def __post_init__(self) -> None:
        if self.downscale < 1:
            raise OptionsError(f"router downscale: {self.downscale} must be at least 1 (1: the latent's grid)")
        if not 0.0 <= self.warmup < 1.0:
            raise OptionsError(f"router_warmup: {self.warmup} is outside [0, 1); use e.g. 0.2 (a fifth of the steps)")
        if not 0.0 <= self.threshold < 1.0 or not self.softness > 0.0:
            raise OptionsError(
                f"router_threshold: {self.threshold} must lie in [0, 1) and softness {self.softness} be above 0"
            )


def subject_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, columns: Sequence[torch.Tensor]
) -> torch.Tensor:
    """q [b, n, h*d], text keys k [b, t, h*d], each subject's token columns (long [c_i]) ->
    [b, s, n]: per subject, the summed softmax probability of its columns, mean over heads.

    Only the subject columns are exponentiated; the normaliser is the logsumexp over every token
    (ComfyUI's fused kernels return no probabilities, so the patch computes these itself)."""
    q = rearrange(q, "b n (h d) -> b h n d", h=heads).float()
    k = rearrange(k, "b t (h d) -> b h t d", h=heads).float()
    scores = torch.einsum("bhnd,bhtd->bhnt", q, k) * q.shape[-1] ** -0.5
    normaliser = scores.logsumexp(dim=-1, keepdim=True)
    maps = [(scores[..., cols] - normaliser).exp().sum(dim=-1).mean(dim=1) for cols in columns]
    return torch.stack(maps, dim=1)


class RouterRun:
    """The maps of one sampling run: what the steps so far and the current call's layers add up to.

    One per run (made by the sampling wrapper, never kept in a patch object, which clones share),
    so nothing leaks from one run into the next. The current model call's maps join the steps so
    far when a call at another sigma begins."""

    def __init__(self) -> None:
        self.done: torch.Tensor | None = None  # [b, s, h, w] sum over completed steps
        self.current: torch.Tensor | None = None  # sum over the read layers of the current step
        self.sigma: float | None = None
        self.version = 0  # bumps with every added map: cached masks are stale

    def begin_call(self, sigma: float | None) -> None:
        if sigma != self.sigma:
            self.done = _plus(self.done, self.current)
            self.current, self.sigma = None, sigma

    def add(self, maps: torch.Tensor) -> None:
        """maps [b, s, h, w] of one read layer (cond rows)."""
        maps = maps.detach()
        if self.done is not None and self.done.shape != maps.shape:  # another batch or size: start over
            self.done = None
        self.current = maps if self.current is None or self.current.shape != maps.shape else self.current + maps
        self.version += 1

    def accumulated(self) -> torch.Tensor | None:
        return _plus(self.done, self.current)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def smoothed(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """maps [b, s, h, w] blurred per map with a 3x3-to-5x5 Gaussian (replicate padding), then / max."""
    if sigma > 0:
        radius = max(1, round(2 * sigma))
        x = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        kernel = kernel / kernel.sum()
        b, s, h, w = maps.shape
        flat = F.pad(maps.reshape(b * s, 1, h, w), (radius,) * 4, mode="replicate")
        flat = F.conv2d(F.conv2d(flat, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
        maps = flat.view(b, s, h, w)
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps / peak


def subject_masks(normalised: torch.Tensor, hw: tuple[int, int], config: AttentionRouterConfig) -> torch.Tensor:
    """Normalised maps [b, s, H, W] -> weights [b, s, h*w] at a layer's grid hw, in [0, 1], at most
    one subject non-zero per pixel (the one whose map is highest; ties go to the first)."""
    if tuple(normalised.shape[-2:]) != tuple(hw):
        normalised = F.interpolate(normalised, size=hw, mode="bilinear", align_corners=False)
    flat = normalised.flatten(2)
    soft = ((flat - config.threshold) / config.softness).clamp_(0.0, 1.0)
    if flat.shape[1] == 1:
        return soft
    winner = F.one_hot(flat.argmax(dim=1), flat.shape[1]).movedim(-1, 1).to(soft)
    return soft * winner


def union(masks: torch.Tensor) -> torch.Tensor:
    """[b, s, n] -> [b, n]: the share of every pixel that some subject has (what is recorded)."""
    return masks.sum(dim=1).clamp_(max=1.0)
