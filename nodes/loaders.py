"""Loaders: MoA weights from models/moa, InsightFace model packs from models/insightface."""

import comfy.model_management as mm
import folder_paths
from comfy.model_patcher import ModelPatcher

from ..moa_core import load_weights
from .host import face, folders
from .types import INSIGHTFACE, MOA_WEIGHTS


class MoALoader:
    DESCRIPTION = (
        "Loads MoA weights (routers, personal attention deltas and the subject fuser) from models/moa. "
        "The file must have been made for the model family it is applied to (SD1.5)."
    )
    CATEGORY = "MoA/loaders"
    RETURN_TYPES = (MOA_WEIGHTS,)
    RETURN_NAMES = ("moa_weights",)
    OUTPUT_TOOLTIPS = ("The MoA weights, for MoA Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "moa_name": (
                    folder_paths.get_filename_list(folders.MOA),
                    {"tooltip": "A .safetensors file in models/moa, written by the MoA trainer or MoA Init Weights."},
                )
            }
        }

    @classmethod
    def load(cls, moa_name: str):
        path = folder_paths.get_full_path_or_raise(folders.MOA, moa_name)
        weights = load_weights(path, dtype=mm.unet_dtype())
        return (ModelPatcher(weights, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()),)


class MoAInsightFaceLoader:
    DESCRIPTION = (
        "Loads an InsightFace model pack for face detection and alignment in MoA Subject. "
        "Put the pack's .onnx files in models/insightface/models/<pack>/."
    )
    CATEGORY = "MoA/loaders"
    RETURN_TYPES = (INSIGHTFACE,)
    RETURN_NAMES = ("face_analysis",)
    OUTPUT_TOOLTIPS = ("InsightFace face analysis, for MoA Subject (also accepted by IPAdapter and InstantID).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_pack": (list(face.MODEL_PACKS), {"tooltip": "The folder name in models/insightface/models/."}),
                "provider": (list(face.PROVIDERS), {"tooltip": "Where onnxruntime runs the face detector."}),
            }
        }

    @classmethod
    def load(cls, model_pack: str, provider: str):
        return (face.load_face_analysis(model_pack, provider),)
