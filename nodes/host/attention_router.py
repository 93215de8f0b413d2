"""The attention router's host side, shared by the MoA and the IP-Adapter patches: which layers it
reads, where its per-run maps live, and the masks a layer gets (the maths is moa_core.attention_router).
"""

import torch
from comfy.model_patcher import ModelPatcher

from ...moa_core.attention_router import AttentionRouterConfig, RouterRun, smoothed, subject_masks
from .unet_layers import attention_modules

RUN_KEY = "moa_router_run"  # transformer_options of one sampling run: its RouterRun


def cross_attention_levels(model: ModelPatcher) -> dict[str, int]:
    """Each cross-attention layer's UNet level: how many times the grid was halved before it."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    unet, levels, level = model.model.diffusion_model, {}, 0
    paths = {path for path in attention_modules(unet) if path.endswith(".attn2")}

    def mark(prefix: str, block) -> None:
        for name, _ in block.named_modules():
            if f"{prefix}.{name}.attn2" in paths:
                levels[f"{prefix}.{name}.attn2"] = level

    for i, block in enumerate(unet.input_blocks):
        level += any(isinstance(m, Downsample) for m in block.modules())
        mark(f"input_blocks.{i}", block)
    mark("middle_block", unet.middle_block)
    for i, block in enumerate(unet.output_blocks):
        mark(f"output_blocks.{i}", block)
        level -= any(isinstance(m, Upsample) for m in block.modules())
    return levels


def read_level(model: ModelPatcher, downscale: int) -> int:
    """The level the attention router reads: the one at `downscale` (4: 16x16 at 512 px), or the
    deepest level with cross-attention where the model has none that deep (small test models)."""
    wanted = max(0, downscale.bit_length() - 1)
    return min(wanted, max(cross_attention_levels(model).values(), default=0))


def read_pixels(latent_hw: tuple[int, int], level: int) -> int:
    """Pixel count of `level` for a latent of latent_hw (stride-2 convolutions, odd sizes round up)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def run_of(transformer_options: dict, sigma: float | None) -> RouterRun:
    """This sampling run's RouterRun (outside a sampler: one for this call alone), told the call's sigma."""
    run = transformer_options.get(RUN_KEY) or RouterRun()
    run.begin_call(sigma)
    return run


def begin_run(guider) -> None:
    """Give a sampling run a fresh RouterRun."""
    keep_for_run(guider, RUN_KEY, RouterRun())


def keep_for_run(guider, key: str, state: object) -> None:
    """Put `state` into a sampling run's transformer_options under `key`. The guider's model_options
    are its copy for this run (CFGGuider.sample clones them), so the state leaves with the run and no
    patch object holds it; an object, not a dict, since ComfyUI copies those dicts at every call."""
    options = getattr(guider, "model_options", None)
    if options is not None:
        options.setdefault("transformer_options", {})[key] = state


def layer_masks(
    run: RouterRun, cache: dict, pixels: int, hw: tuple[int, int], config: AttentionRouterConfig
) -> torch.Tensor | None:
    """Each subject's weights [b, s, n] at a layer of `pixels` (grid hw), from the maps read so far;
    None before any map was read. Cached per call until the next map arrives."""
    key = (pixels, run.version)
    if key not in cache:
        accumulated = run.accumulated()
        if accumulated is None:
            return None
        cache[key] = subject_masks(smoothed(accumulated, config.blur), hw, config)
    return cache[key]
