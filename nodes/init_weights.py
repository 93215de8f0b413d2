"""MoA Init Weights: an untrained MoA for the loaded model, written to models/moa."""

from pathlib import Path

import comfy.model_management as mm
import folder_paths
from comfy.model_patcher import ModelPatcher

from ..moa_core import FuserConfig, MoAError, moa_init, save_weights
from .host import folders
from .host.unet_layers import layer_specs, model_family
from .types import MOA_WEIGHTS


class MoAInitWeights:
    DESCRIPTION = (
        "Writes untrained MoA weights for the connected model to models/moa: zero deltas, a fuser that "
        "passes the word through, routers leaning to the prior. The output equals the plain model's; this is "
        "where the MoA trainer starts."
    )
    CATEGORY = "MoA/training"
    RETURN_TYPES = (MOA_WEIGHTS,)
    RETURN_NAMES = ("moa_weights",)
    OUTPUT_TOOLTIPS = ("The new weights (also saved to models/moa).",)
    FUNCTION = "write"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the weights are made for (SD1.5)."}),
                "filename": ("STRING", {"default": "moa_init", "tooltip": "File name in models/moa (no extension)."}),
                "delta_rank": (
                    "INT",
                    {"default": 0, "min": 0, "max": 1024, "tooltip": "0: full-rank deltas; else their rank."},
                ),
                "fuser_timestep_conditioning": ("BOOLEAN", {"default": True, "tooltip": "Fused token depends on t."}),
                "fuser_layer_conditioning": ("BOOLEAN", {"default": True, "tooltip": "... and on the layer."}),
            }
        }

    @classmethod
    def write(cls, model, filename, delta_rank, fuser_timestep_conditioning, fuser_layer_conditioning):
        family = model_family(model)
        if family is None:
            raise MoAError("MoAInitWeights.model: MoA supports SD1.5 and SDXL models; load an SD1.5 checkpoint")
        name = Path(filename).name
        if not name or name != filename:
            raise MoAError(f"MoAInitWeights.filename: {filename!r} must be a plain file name without folders")
        target = Path(folder_paths.get_folder_paths(folders.MOA)[0]) / f"{name}.safetensors"
        if target.exists():
            raise MoAError(f"MoAInitWeights.filename: {target} exists; choose another name")
        specs = layer_specs(model.model.diffusion_model)
        text_dim = next(spec.context_dim for spec in specs if spec.is_cross)
        fuser = FuserConfig(
            text_dim=text_dim,
            timestep_conditioning=fuser_timestep_conditioning,
            layer_conditioning=fuser_layer_conditioning,
        )
        weights = moa_init(family, specs, fuser, delta_rank=delta_rank)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_weights(weights, target)
        patcher = ModelPatcher(weights.eval().requires_grad_(False), mm.get_torch_device(), mm.unet_offload_device())
        return {"ui": {"text": [str(target)]}, "result": (patcher,)}
