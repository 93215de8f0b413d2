"""Tier 2: a photo's latent inverted with the prior and regenerated, with and without MoA."""

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import pytest
import torch

from comfyui_moa.moa_core import MoAError
from comfyui_moa.nodes import NODE_CLASS_MAPPINGS as NODES
from moa_testing.tiny import FAMILIES

STEPS = 8
SEEDS = (0, 1, 2)


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """||estimate - target|| / ||target||."""
    estimate, target = estimate.detach().float(), target.detach().float()
    return float((estimate - target).norm() / target.norm())


def photo_latent(seed: int, size: int = 32) -> dict:
    """A LATENT as VAE Encode gives it: smooth, in the VAE's units (about 1 / 0.18 of the UNet's)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return {"samples": smooth * 5.0}


def invert(model, conds, latent, refine=2, cfg=1.0, steps=STEPS):
    (inversion,) = NODES["MoAInvert"].invert(model, *conds, latent, steps, "normal", cfg, refine)
    return inversion


def regenerate(model, conds, inversion, keep_outside=False, **kw):
    (out,) = NODES["MoARegenerate"].regenerate(model, *conds, inversion, keep_outside, **kw)
    return out["samples"]


def square(size: int = 32) -> torch.Tensor:
    """A region over the middle quarter of the image."""
    region = torch.zeros(size, size)
    region[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return region


@pytest.mark.parametrize("family", FAMILIES)
def test_refined_inversion_regenerates_the_photo_a_hundred_times_closer_than_plain_ddim(base_model, conds, family):
    for seed in SEEDS:
        latent = photo_latent(seed)
        plain, refined, guided = (
            relative_error(regenerate(base_model, conds, invert(base_model, conds, latent, r, cfg)), latent["samples"])
            for r, cfg in ((0, 1.0), (2, 1.0), (2, 3.0))
        )
        assert plain < 0.02, f"seed {seed}: plain DDIM inversion is off by {plain:.2%}"
        assert refined < 1e-5 and refined < plain / 100, (seed, plain, refined)
        assert guided < 1e-5, f"seed {seed}: inverting and sampling at cfg 3 is off by {guided:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_moa_at_strength_zero_regenerates_what_the_prior_does_bit_for_bit(base_model, conds, apply, trained):
    inversion = invert(base_model, conds, photo_latent(0))
    assert torch.equal(
        regenerate(apply(trained, strength=0.0), conds, inversion), regenerate(base_model, conds, inversion)
    )


def test_refine_zero_is_flip_sigmas_with_euler_and_regeneration_is_ksampler_euler(base_model, conds):
    # what SamplerCustom computes with FlipSigmas (sigma 0 -> 1e-4) and euler, add_noise off
    latent = photo_latent(0)
    sigmas = comfy.samplers.calculate_sigmas(base_model.get_model_object("model_sampling"), "normal", STEPS)
    flipped = sigmas.flip(0).clone()
    flipped[0] = 1e-4
    euler = comfy.samplers.sampler_object("euler")
    core = comfy.sample.sample_custom(
        base_model, torch.zeros(1, 4, 32, 32), 1.0, euler, flipped, *conds, latent["samples"], disable_pbar=True
    )
    inversion = invert(base_model, conds, latent, refine=0)
    assert relative_error(inversion["samples"], core) < 1e-3
    down = comfy.sample.sample_custom(
        base_model, torch.zeros(1, 4, 32, 32), 1.0, euler, sigmas, *conds, inversion["samples"], disable_pbar=True
    )
    assert relative_error(regenerate(base_model, conds, inversion), down) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_moa_confined_to_a_region_changes_the_photo_inside_it(base_model, conds, apply, trained):
    region = square()
    inside = region.bool()
    patched = apply(trained, region=region)
    for seed in SEEDS:
        latent = photo_latent(seed)
        original = latent["samples"][0]
        inversion = invert(base_model, conds, latent)
        change = (regenerate(patched, conds, inversion)[0] - original).abs().mean(0)
        outside_change, inside_change = change[~inside].mean(), change[inside].mean()
        assert outside_change < 0.5 * inside_change, (seed, outside_change, inside_change)
        kept = regenerate(patched, conds, inversion, keep_outside=True, mask=region[None])[0]
        # the photo itself outside, to the rounding of the latent's scale factor (in and out of the UNet's units)
        assert torch.allclose(kept[:, ~inside], original[:, ~inside], rtol=1e-6, atol=1e-5)
        assert (kept[:, inside] - original[:, inside]).abs().mean() > 0.5 * inside_change


def test_keep_outside_holds_the_photo_where_the_router_gives_the_prior_most_of_a_pixel(
    base_model, conds, apply, trained
):
    """The random routers' mean map is flat (about 0.74 everywhere); biased to the prior it is about 0.02.
    The small world's test (test_world_photo_swap) has maps that split an image."""
    from comfyui_moa.moa_core.router import Router

    latent = photo_latent(0)
    photo = latent["samples"][0]
    inversion = invert(base_model, conds, latent)

    def free_and_kept():
        patched, record = apply(trained, record=True)
        free = regenerate(patched, conds, inversion)[0]
        kept = regenerate(patched, conds, inversion, keep_outside=True, router_record=record)[0]
        return free, kept, record.stack((32, 32), record.layers(), [STEPS - 1], batch=1)[0].mean(0)[0]

    free, kept, last = free_and_kept()
    assert last.min() > 0.5 and (free - photo).abs().mean() > 1e-3
    assert torch.allclose(kept, free, rtol=1e-6, atol=1e-6), "r1 above 0.5 everywhere: nothing is held"
    with torch.no_grad():
        for router in (m for m in trained.modules() if isinstance(m, Router)):
            router.fc2.bias.copy_(torch.tensor([4.0, 0.0]))
    free, kept, last = free_and_kept()
    assert last.max() < 0.5 and (free - photo).abs().mean() > 1e-5
    # the last step sets every pixel to the photo's own latent (to the rounding of the latent's scale factor)
    assert torch.allclose(kept, photo, rtol=1e-6, atol=1e-5)


def test_bad_inputs_are_refused_by_name(base_model, conds):
    latent = photo_latent(0)
    inversion = invert(base_model, conds, latent, refine=0, steps=2)
    with pytest.raises(MoAError, match=r"MoARegenerate\.inversion: this LATENT was not made by MoA Invert"):
        regenerate(base_model, conds, latent)
    resized = dict(inversion, samples=inversion["samples"][..., :16, :16])
    with pytest.raises(MoAError, match=r"MoARegenerate\.inversion: the latent is \[1, 4, 16, 16\].*resized"):
        regenerate(base_model, conds, resized)
    with pytest.raises(MoAError, match=r"MoARegenerate\.keep_outside: needs MoA Apply's router_record"):
        regenerate(base_model, conds, inversion, keep_outside=True)
    with pytest.raises(MoAError, match=r"MoARegenerate\.mask: 2 masks for a batch of 1"):
        regenerate(base_model, conds, inversion, keep_outside=True, mask=torch.ones(2, 32, 32))
    with pytest.raises(MoAError, match=r"MoAInvert\.latent: expected a photo's latent"):
        invert(base_model, conds, {"samples": torch.zeros(1, 3, 32, 32)})
    flow = base_model.clone()
    sampling = type("Sampling", (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST), {})
    flow.add_object_patch("model_sampling", sampling(base_model.model.model_config))
    with pytest.raises(MoAError, match=r"MoAInvert\.model: .* flow or image-to-image schedule"):
        invert(flow, conds, latent)
    with pytest.raises(MoAError, match=r"MoARegenerate\.model: .* flow or image-to-image schedule"):
        regenerate(flow, conds, inversion)


def test_on_the_random_checkpoint_refinement_still_brings_the_photo_closer(sd15_checkpoint_file):
    # CheckpointLoaderSimple's SD1.5 model, CLIP and VAE; a drawn photo through VAE Encode, 256 px. Its
    # random UNet is no smooth denoiser: the walk does not contract and neither inversion returns the
    # photo (relative errors of 250 plain and 125 refined at seed 0, on a latent of std 0.06), so this
    # checks only that refinement helps where the exact bound cannot hold; the tiny model checks the bound.
    import comfy.sd

    from moa_testing.model_files import draw_faces

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint_file))
    conds = tuple(clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in ("a photo of a man", ""))
    for seed in SEEDS[:2]:
        pixels = torch.from_numpy(draw_faces(256, [(80, 60, 100)], seed=seed)).float()[None] / 255.0
        latent = {"samples": vae.encode(pixels)}
        plain, refined = (
            relative_error(regenerate(model, conds, invert(model, conds, latent, r)), latent["samples"]) for r in (0, 2)
        )
        assert refined < 0.75 * plain, (seed, plain, refined)
