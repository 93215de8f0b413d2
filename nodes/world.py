"""MoA World Loader: the small world's prior (moa_world/), which ComfyUI's checkpoint detection
cannot recognise (a 12-channel SD1.5-family UNet, a 32-d CLIP, a lossless pixel "VAE")."""

from pathlib import Path

from ..moa_core import MoAError

SHIPPED = "shipped (moa_world/assets/prior)"
CACHE = Path.home() / ".cache" / "comfyui-moa" / "world"


def world_choices() -> dict[str, Path]:
    """The shipped world, then every trained world in the cache (~/.cache/comfyui-moa/world)."""
    shipped = Path(__file__).resolve().parents[1] / "moa_world" / "assets" / "prior"
    choices = {SHIPPED: shipped}
    if CACHE.is_dir():
        for folder in sorted(CACHE.iterdir()):
            if (folder / "world.json").is_file() and (folder / "unet.safetensors").is_file():
                choices[folder.name] = folder
    return choices


class MoAWorldLoader:
    DESCRIPTION = (
        "Loads the small world's prior: a small SD1.5-family text-to-image model trained on synthetic 32x32 "
        "scenes of cats and dogs (python -m moa_world), with its text encoder, pixel VAE and subject image "
        "encoder. Sample it at width = height = 128 in Empty Latent Image (a 16x16 latent, 32x32 pixels)."
    )
    CATEGORY = "MoA/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "CLIP_VISION")
    RETURN_NAMES = ("model", "clip", "vae", "clip_vision")
    OUTPUT_TOOLTIPS = (
        "The world's UNet (SD1.5 family, EPS), for KSampler and MoA Apply.",
        "The world's text encoder (SD1 tokenizer, 32-d), for CLIP Text Encode and MoA Apply.",
        "The world's pixel VAE (32x32 RGB <-> 12x16x16), for VAE Decode / VAE Encode.",
        "The world's subject encoder (a tiny CLIP vision model), for MoA Subject.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "world": (
                    list(world_choices()),
                    {"tooltip": "The shipped world in the pack, or a world trained by `python -m moa_world build`."},
                )
            }
        }

    @classmethod
    def load(cls, world: str):
        folder = world_choices().get(world)
        if folder is None or not (folder / "world.json").is_file():
            raise MoAError(
                f"MoAWorldLoader.world: {world!r} is no world folder; pick one listed, or build one with "
                "`python -m moa_world build` (the shipped one is written by `python -m moa_world ship`)"
            )
        from ..moa_world.models import load_world

        loaded = load_world(folder)
        return (loaded.model, loaded.clip, loaded.vae, loaded.vision)
