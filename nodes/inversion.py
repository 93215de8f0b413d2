"""MoA Invert and MoA Regenerate: swap the subject of a real photo, keeping the rest of it."""

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
import torch.nn.functional as F

from ..moa_core import MoAError
from ..moa_core.inversion import Inversion, invert, sample_back
from .types import MOA_RECORD

ROUTED = 0.5
"""keep_outside lets a pixel change where the router's mean map r1 is above this: soft maps (r1 itself)
pull the subject back towards the photo too (docs/small-world.md, "The real-photo swap")."""

INVERSION_KEY = "moa_inversion"
"""Where MoA Invert's LATENT carries the inverted walk; other nodes copy or drop it."""


def _model_sampling(model, input_name: str):
    """The model's sampling object, if its latents follow x = x0 + sigma * eps (EPS, v, x0 prediction)."""
    sampling = model.get_model_object("model_sampling")
    eps = comfy.model_sampling.EPS
    if not (
        isinstance(sampling, eps)
        and type(sampling).noise_scaling is eps.noise_scaling
        and type(sampling).inverse_noise_scaling is eps.inverse_noise_scaling
        and type(sampling).calculate_input is eps.calculate_input
    ):
        raise MoAError(
            f"{input_name}: inversion needs a model whose noisy latents are the image plus sigma times noise "
            f"(SD1.5, SDXL and their fine-tunes, eps or v prediction); this one samples with "
            f"{type(sampling).__name__}, a flow or image-to-image schedule. Use an SD1.5 or SDXL checkpoint"
        )
    return sampling


def _denoiser(model, extra_args: dict, batch: int):
    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return model(x, x.new_full((batch,), sigma), **extra_args)

    return denoise


def _invert_function(model, x, sigmas, extra_args=None, callback=None, disable=None, refine=0, floor=1e-4, out=None):
    """A KSAMPLER function walking up `sigmas` (ascending from 0: the flipped schedule)."""
    descending = sigmas.flip(0).tolist()

    def on_step(i: int, latent: torch.Tensor) -> None:
        if callback is not None:
            callback({"i": i, "x": latent, "denoised": latent, "sigma": descending[-i - 2]})

    path = invert(_denoiser(model, extra_args or {}, x.shape[0]), x, descending, refine, floor, on_step)
    out.extend(latent.to(mm.intermediate_device()) for latent in path)
    return path[0]


def _regenerate_function(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, keep=None):
    """A KSAMPLER function sampling down the inversion's schedule from its noise (`x` is not used)."""

    def on_step(i: int, latent: torch.Tensor, denoised: torch.Tensor) -> None:
        if callback is not None:
            callback({"i": i, "x": latent, "denoised": denoised, "sigma": inversion.sigmas[i]})

    return sample_back(_denoiser(model, extra_args or {}, x.shape[0]), inversion, keep, on_step)


class MoAInvert:
    DESCRIPTION = (
        "Walks a photo's latent up the plain model's noise schedule (DDIM inversion), so that MoA Regenerate, "
        "sampling back down from it, returns the photo, and with MoA and another subject changes only the "
        "subject. Use the checkpoint's model without MoA and a prompt that describes the photo."
    )
    CATEGORY = "MoA/photo"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("inversion",)
    OUTPUT_TOOLTIPS = ("The photo's noise and the walk to it: for MoA Regenerate.",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The plain model (no MoA): the prior that paints the photo's scene."}),
                "positive": ("CONDITIONING", {"tooltip": "A prompt describing the photo, with the subject's word."}),
                "negative": ("CONDITIONING", {"tooltip": "Used only when cfg is above 1."}),
                "latent": ("LATENT", {"tooltip": "The photo, through VAE Encode."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Regeneration uses the same."}),
                "scheduler": (
                    comfy.samplers.SCHEDULER_NAMES,
                    {"default": "normal", "tooltip": "The noise schedule; regeneration uses the same."},
                ),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 1.0,
                        "max": 30.0,
                        "step": 0.1,
                        "tooltip": "Guidance of the walk; MoA Regenerate samples with the same. 1 is the "
                        "steadiest (conditional model only, half the calls).",
                    },
                ),
                "refine": (
                    "INT",
                    {
                        "default": 2,
                        "min": 0,
                        "max": 10,
                        "tooltip": "Fixed-point iterations per step: each makes the walk closer to the exact "
                        "inverse of sampling, for one more model call. 0 is plain DDIM inversion.",
                    },
                ),
            }
        }

    @classmethod
    def invert(cls, model, positive, negative, latent, steps, scheduler, cfg, refine):
        sampling = _model_sampling(model, "MoAInvert.model")
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != model.get_model_object("latent_format").latent_channels:
            raise MoAError(
                f"MoAInvert.latent: expected a photo's latent [batch, channels, h, w] for this model, got "
                f"{list(samples.shape)}; connect VAE Encode of the photo with this checkpoint's VAE"
            )
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps).cpu()
        path: list[torch.Tensor] = []
        options = {"refine": refine, "floor": float(sampling.sigma_min), "out": path}
        sampler = comfy.samplers.KSAMPLER(_invert_function, extra_options=options)
        callback = latent_preview.prepare_callback(model, steps)
        noise = torch.zeros_like(samples)
        out_samples = comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            sampler,
            sigmas.flip(0),  # up the schedule: it starts at 0, so no noise is scaled into the latent
            positive,
            negative,
            samples,
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=0,
        )
        out = {key: value for key, value in latent.items() if key != "noise_mask"}
        out["samples"] = out_samples
        out[INVERSION_KEY] = Inversion(tuple(sigmas.tolist()), tuple(path), cfg)
        return (out,)


class MoARegenerate:
    DESCRIPTION = (
        "Samples the photo back from MoA Invert's noise, on its schedule and guidance, with the model you give "
        "it: MoA Apply's model paints the new subject where the router sends pixels to it and the prior repaints "
        "the rest of the photo. keep_outside holds the photo's own walk outside the router's mask at every "
        "step, for when the background drifts."
    )
    CATEGORY = "MoA/photo"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The photo with the new subject: VAE Decode it; MoA Router Masks shows the router.",)
    FUNCTION = "regenerate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "MoA Apply's model (the plain one returns the photo)."}),
                "positive": ("CONDITIONING", {"tooltip": "MoA Apply's positive."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative MoA Invert had (used when its cfg > 1)."}),
                "inversion": ("LATENT", {"tooltip": "From MoA Invert, unchanged."}),
                "keep_outside": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "At every step, keep the photo's own walk where the router sends pixels "
                        "mostly to the prior (its mean map at or under 0.5), or where the mask is 0.",
                    },
                ),
            },
            "optional": {
                "router_record": (MOA_RECORD, {"tooltip": "MoA Apply's: where the router sent each pixel."}),
                "mask": ("MASK", {"tooltip": "Where the subject may change (1), instead of the router's maps."}),
            },
        }

    @classmethod
    def regenerate(cls, model, positive, negative, inversion, keep_outside, router_record=None, mask=None):
        walk: Inversion | None = inversion.get(INVERSION_KEY)
        if walk is None:
            raise MoAError(
                "MoARegenerate.inversion: this LATENT was not made by MoA Invert; connect MoA Invert's output "
                "directly (nodes in between drop the walk)"
            )
        if tuple(inversion["samples"].shape) != walk.shape:
            raise MoAError(
                f"MoARegenerate.inversion: the latent is {list(inversion['samples'].shape)} but MoA Invert walked "
                f"{list(walk.shape)}; it was resized or batched on the way. Connect MoA Invert's output directly"
            )
        sampling = _model_sampling(model, "MoARegenerate.model")
        low, high = float(sampling.sigma_min), float(sampling.sigma_max)
        if not (low * (1 - 1e-4) <= walk.sigmas[-2] and walk.sigmas[0] <= high * (1 + 1e-4)):
            raise MoAError(
                f"MoARegenerate.model: its noise schedule ({low:.4g} to {high:.4g}) does not hold the inversion's "
                f"({walk.sigmas[-2]:.4g} to {walk.sigmas[0]:.4g}); use the checkpoint MoA Invert used"
            )
        keep = _keep_mask(router_record, mask, walk.shape) if keep_outside else None
        sampler = comfy.samplers.KSAMPLER(_regenerate_function, extra_options={"inversion": walk, "keep": keep})
        samples = comfy.sample.sample_custom(
            model,
            torch.zeros(walk.shape),
            walk.cfg,
            sampler,
            torch.tensor(walk.sigmas),
            positive,
            negative,
            inversion["samples"],
            callback=latent_preview.prepare_callback(model, len(walk.sigmas) - 1),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=0,
        )
        out = {key: value for key, value in inversion.items() if key != INVERSION_KEY}
        out["samples"] = samples
        return (out,)


def _keep_mask(router_record, mask, shape):
    """keep_mask(step) for sample_back: the given mask, or the router's maps of that step."""
    size = tuple(shape[-2:])
    if mask is not None:
        fixed = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=size, mode="bilinear")
        if fixed.shape[0] not in (1, shape[0]):
            raise MoAError(
                f"MoARegenerate.mask: {fixed.shape[0]} masks for a batch of {shape[0]}; give one mask, or one per image"
            )
        return lambda step: fixed
    if router_record is None:
        raise MoAError(
            "MoARegenerate.keep_outside: needs MoA Apply's router_record (with record_router_maps on) or a mask "
            "to know where the subject is; connect one, or turn keep_outside off"
        )

    def from_router(step: int) -> torch.Tensor:
        layers = router_record.layers()
        if not layers:  # MoA has not acted yet: the prior painted every pixel
            return torch.zeros(1, 1, *size)
        maps = router_record.stack(size, layers, [step], batch=shape[0])[0].mean(0)[:, None]
        return (maps > ROUTED).float()

    return from_router
