"""The inversion's walks on denoisers whose slopes are known (x times a factor of sigma), in float64."""

import torch

from comfyui_moa.moa_core.inversion import Inversion, invert, sample_back

SIGMAS = [14.6, 9.0, 5.0, 2.5, 1.0, 0.4, 0.0]


def shrinking(a: float):
    """D(x, sigma) = x / (1 + a sigma^2): slope a sigma x / (1 + a sigma^2), x itself at sigma 0."""
    return lambda x, sigma: x / (1 + a * sigma**2)


def steep(g: float):
    """D(x, sigma) = x (1 - g sigma): slope g x at every sigma."""
    return lambda x, sigma: x * (1 - g * sigma)


def latent() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_refinement_makes_the_walk_the_samplers_inverse():
    denoise, photo = shrinking(0.1), latent()  # each step's iteration contracts (by 0.36-0.4 here)
    errors = []
    for refine in (0, 2, 8):
        walk = invert(denoise, photo, SIGMAS, refine)
        back = sample_back(denoise, Inversion(tuple(SIGMAS), tuple(walk), 1.0))
        errors.append(float((back - photo).norm() / photo.norm()))
    assert errors[0] > 0.1 and errors[1] < errors[0] / 5 and errors[2] < errors[1] / 100, errors


def test_an_iteration_that_does_not_contract_keeps_the_point_that_missed_least():
    # slope 5 x: a refinement multiplies a step's miss by 5 * step (2 to 28 on these sigmas), so each
    # misses more than the plain step did; the walk keeps the plain step's points
    denoise, photo = steep(5.0), latent()
    plain, refined = invert(denoise, photo, SIGMAS, 0), invert(denoise, photo, SIGMAS, 4)
    assert all(torch.equal(a, b) for a, b in zip(plain, refined, strict=True))
    unguarded = photo  # what the iteration alone reaches
    for low, high in zip(SIGMAS[::-1][:-1], SIGMAS[::-1][1:], strict=True):
        x_high = unguarded + (high - low) * 5 * unguarded
        for _ in range(4):
            x_high = unguarded + (high - low) * 5 * x_high
        unguarded = x_high
    assert unguarded.norm() > 1e3 * refined[0].norm()
