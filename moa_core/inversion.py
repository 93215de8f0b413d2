"""Real-image inversion: a photo's latent walked up the prior's noise schedule, so that sampling back
down the same schedule returns it, and MoA, sampling down with a subject, changes only the subject.

Both walks are Euler steps on the probability-flow ODE in the sampler's own variables (x = x0 + sigma
* eps, sigmas in the sampler's order), which on an EPS schedule is DDIM. Plain DDIM inversion takes a
step's slope at its start, where sampling takes it at the other end, so each step is off by the change
of slope along it. `refine` fixed-point iterations solve for the point whose sampling step lands on
the previous one, making the inversion the sampler's own inverse as far as they converge; where they
stop contracting for an image (its miss grows), that image keeps the point that missed least.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""The sampler's model call: x at noise level sigma -> the denoised latent (CFG already applied)."""


@dataclass(frozen=True)
class Inversion:
    """The inverted walk, in the sampler's order: `latents[i]` is x at `sigmas[i]`; `latents[0]` is
    the noise that sampling starts from, `latents[-1]` the photo's latent (sigma 0)."""

    sigmas: tuple[float, ...]
    latents: tuple[torch.Tensor, ...]
    cfg: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents[0].shape)


def slope(denoise: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE at (x, sigma): the model's noise estimate."""
    return (x - denoise(x, sigma)) / sigma


@torch.no_grad()  # the walk is kept: a graph through it would hold every step's activations
def invert(
    denoise: Denoiser,
    latent: torch.Tensor,
    sigmas: Sequence[float],
    refine: int = 0,
    sigma_floor: float = 1e-4,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """x at every sigma of `sigmas` (descending, ending at 0, as the sampler runs them), from `latent` at
    sigma 0 up to the first sigma; returned in the sampler's order. `sigma_floor` stands in for sigma 0
    where a slope is needed there (the first step, without refinement)."""
    if len(sigmas) < 2 or sigmas[-1] != 0 or any(a <= b for a, b in pairwise(sigmas)):
        raise ValueError(f"sigmas must descend strictly to 0, got {list(sigmas)}")
    upward = list(reversed(sigmas))
    path = [latent]
    x = latent
    for i, (low, high) in enumerate(pairwise(upward)):
        step = high - low
        x_high = x + step * slope(denoise, x, max(low, sigma_floor))
        best, best_miss = x_high, torch.full((len(x),), torch.inf, device=x.device)
        stuck = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(refine):
            # the sampling step from (x_high, high) must land on x; it misses by x_high - x_next
            x_next = x + step * slope(denoise, x_high, high)
            miss = (x_next - x_high).flatten(1).norm(dim=1)
            stuck |= miss >= best_miss  # not contracting: that image keeps its best point so far
            best = torch.where(_rows(stuck, x), best, x_high)
            best_miss = torch.where(stuck, best_miss, miss)
            x_high = torch.where(_rows(stuck, x), best, x_next)
        x = x_high
        path.append(x)
        if on_step is not None:
            on_step(i, x)
    return path[::-1]


def _rows(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def sample_back(
    denoise: Denoiser,
    inversion: Inversion,
    keep_mask: Callable[[int], torch.Tensor | None] | None = None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler sampling down the inversion's sigmas from its noise (k-diffusion's `sample_euler`, step for
    step). With `keep_mask(i)`, a mask [b, 1, h, w] or [1, 1, h, w] in [0, 1] of where the new
    sample may differ (1) after step i, the rest of x is set to the inverted walk's latent there
    (local blending); a None mask keeps nothing at that step."""
    sigmas = inversion.sigmas
    x = inversion.latents[0].clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        if on_step is not None:
            on_step(i, x, denoised)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        mask = keep_mask(i) if keep_mask is not None else None
        if mask is not None:
            inverted = inversion.latents[i + 1].to(x)
            x = inverted + mask.to(x) * (x - inverted)
    return x
