"""MoA Router Masks: where the personal expert painted, as pictures."""

import comfy.utils
import torch

from ..moa_core import MoAError
from ..moa_core.record import KEPT_RUNS
from ..moa_core.render import grid, heatmap, overlay
from ..moa_core.unet_layout import LAYER_GROUPS, grid_rows, layers_in_group
from .host import viewer
from .types import MOA_RECORD

GRID_TILE = 64


class MoARouterMasks:
    DESCRIPTION = (
        "Shows where the router sent each pixel during the sampling run that made the latent: bright where "
        "the personal expert painted (the subject), dark where the frozen prior did. Averages the chosen "
        "layers and steps; the grid shows every layer (rows) at every step (columns), or with more than 32 "
        "layers (SDXL) every UNet block's self- and cross-attention. Connect the sampler's "
        "LATENT so it runs after sampling and reads that run's maps. After a run, the viewer on the node "
        "scrubs through the steps and layer groups without running again."
    )
    CATEGORY = "MoA"
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("masks", "mask", "layer_step_grid")
    OUTPUT_TOOLTIPS = (
        "Heatmap of the personal expert's share, over the image when one is connected.",
        "The personal expert's share per pixel (0: prior, 1: personal).",
        "One heatmap per layer (rows, UNet order; SDXL: per block and attention kind) and sampling step "
        "(columns), first image of the batch.",
    )
    FUNCTION = "render"
    OUTPUT_NODE = True  # the viewer on the node is an output of its own: it runs with nothing connected

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "router_record": (MOA_RECORD, {"tooltip": "From MoA Apply."}),
                "latent": ("LATENT", {"tooltip": "The sampler's output: orders this node after sampling."}),
                "layers": (list(LAYER_GROUPS), {"tooltip": "Which attention layers to average."}),
                "start_percent": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "First step to average."},
                ),
                "end_percent": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Last step to average."},
                ),
            },
            "optional": {"image": ("IMAGE", {"tooltip": "The decoded image, to draw the masks over it."})},
        }

    @classmethod
    def render(cls, router_record, latent, layers, start_percent, end_percent, image=None):
        if router_record is None:
            raise MoAError("MoARouterMasks.router_record: MoA Apply ran with record_router_maps off; turn it on")
        if router_record.runs == 0:
            raise MoAError(
                "MoARouterMasks.router_record: no sampler has run with this MoA model; connect MoA Apply's model "
                "output to the sampler whose LATENT feeds this node"
            )
        run = router_record.of_samples(latent["samples"])
        if run is None:
            raise MoAError(
                "MoARouterMasks.latent: no finished sampling run of this MoA model made these samples (maps of "
                f"interrupted runs, and of runs before the last {KEPT_RUNS}, are not kept); connect the LATENT "
                "output of the sampler that used MoA Apply's model, unchanged, and queue again"
            )
        router_record = run
        chosen = layers_in_group(router_record.layer_paths, layers)
        steps = list(range(len(router_record.sigmas) - 1))
        first = round(start_percent * (len(steps) - 1))
        window = steps[first : max(first, round(end_percent * (len(steps) - 1))) + 1]
        height, width = image.shape[1:3] if image is not None else [s * 8 for s in latent["samples"].shape[-2:]]
        progress = comfy.utils.ProgressBar(3)
        # Steps where MoA did not act (strength 0, outside start/end) are all prior: r1 = 0.
        maps = router_record.stack((height, width), chosen, window, batch=latent["samples"].shape[0])
        mask = maps.mean(dim=(0, 1))
        progress.update(1)
        picture = overlay(image.cpu().float(), mask) if image is not None else heatmap(mask)
        everything = router_record.stack((GRID_TILE, GRID_TILE), chosen, steps, batch=1)[:, :, 0]  # [T, L, h, w]
        rows = grid_rows(router_record.layer_paths, chosen)
        if len(rows) < len(chosen):  # SDXL's 140 layers: a row per block and attention kind
            position = {layer: k for k, layer in enumerate(chosen)}
            everything = torch.stack([everything[:, [position[i] for i in row]].mean(1) for row in rows], 1)
        progress.update(1)
        shown = viewer.publish(router_record, layers, maps.shape[2], tuple(latent["samples"].shape[-2:]), image)
        progress.update(1)
        return {"ui": {viewer.UI_KEY: [shown]}, "result": (picture, mask, grid(everything.transpose(0, 1), GRID_TILE))}
