"""IP-Adapter files as MoA experts: load one, and apply it with one word per subject."""

import comfy.model_management as mm
import folder_paths
from comfy.model_patcher import ModelPatcher

from ..moa_core import MoAError, RouterRecord
from ..moa_core.attention_router import AttentionRouterConfig
from ..moa_core.ipadapter import WEIGHT_PRESETS, load_ipadapter
from .host import folders
from .host.ipadapter import (
    build_runtime,
    check_adapter_fits,
    check_subjects,
    convert_command,
    cross_attention_paths,
    negative_output,
)
from .host.ipadapter_patch import ATTENTION, ROUTER_MODES, apply_ipadapter
from .host.patch import DEFAULT_SPARSE_THRESHOLD, has_moa
from .host.text import bind_subject_words, parse_subject_words
from .types import MOA_IPADAPTER, MOA_RECORD, MOA_SUBJECTS

APPLY = "MoAIPAdapterApply"


class MoAIPAdapterLoader:
    DESCRIPTION = (
        "Loads an IP-Adapter from models/ipadapter as a MoA personal expert: SD1.5's ip-adapter_sd15, light_v11, "
        "plus, plus-face, full-face, or SDXL's ip-adapter_sdxl_vit-h, plus_sdxl_vit-h, plus-face_sdxl_vit-h, "
        "ip-adapter_sdxl (.safetensors). A .bin file is refused with the one command that converts it."
    )
    CATEGORY = "MoA/loaders"
    RETURN_TYPES = (MOA_IPADAPTER,)
    RETURN_NAMES = ("ipadapter",)
    OUTPUT_TOOLTIPS = ("The IP-Adapter, for MoA IP-Adapter Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ipadapter_name": (
                    folder_paths.get_filename_list(folders.IPADAPTER),
                    {"tooltip": "An IP-Adapter file in models/ipadapter (the folder ComfyUI_IPAdapter_plus uses)."},
                )
            }
        }

    @classmethod
    def load(cls, ipadapter_name: str):
        path = folder_paths.get_full_path_or_raise(folders.IPADAPTER, ipadapter_name)
        adapter = load_ipadapter(path, "MoAIPAdapterLoader.ipadapter_name", convert_command())
        adapter = adapter.to(mm.unet_dtype())
        return (ModelPatcher(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()),)


def _float(default, low, high, step, tooltip):
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


class MoAIPAdapterApply:
    DESCRIPTION = (
        "Personalizes the model with an IP-Adapter as MoA's personal expert: each subject's image attention is "
        "added only where a router sends the pixel, the rest of the image stays exactly the base model's. The "
        "router reads where each subject's word is drawn from the model's own cross-attention (no training), "
        "so several subjects each land in their own place without masks. Use the CONDITIONING output as the "
        "sampler's positive; the record goes to MoA Router Masks."
    )
    CATEGORY = "MoA"
    RETURN_TYPES = ("MODEL", "CONDITIONING", MOA_RECORD)
    RETURN_NAMES = ("model", "positive", "router_record")
    OUTPUT_TOOLTIPS = (
        "The model with the IP-Adapter experts in its cross-attention layers.",
        "The prompt, encoded: the sampler's positive input (the router reads the subject words in it).",
        "Where the router sent each pixel, filled while sampling: for MoA Router Masks.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "An SD1.5 or SDXL model (checkpoint, fine-tune, LoRAs): the IP-Adapter's family."},
                ),
                "ipadapter": (MOA_IPADAPTER, {"tooltip": "From MoA IP-Adapter Loader."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes the prompt and finds the words."}),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "default": "a man and a woman having coffee in a cafe",
                        "tooltip": "The prompt. Name every subject with its word; weights like (man:1.2) work.",
                    },
                ),
                "subject_words": (
                    "STRING",
                    {
                        "default": "man, woman",
                        "tooltip": "One word (or phrase) per subject, comma-separated, in the order of the subjects. "
                        "The router puts each subject where the model draws its word.",
                    },
                ),
                "subjects": (
                    MOA_SUBJECTS,
                    {"tooltip": "From MoA Subject fed a CLIP ViT-H (ip-adapter_sdxl: ViT-bigG): a subject per word."},
                ),
                "weight": _float(1.0, 0.0, 3.0, 0.05, "IP-Adapter's weight: how strongly each subject's image counts."),
                "weight_type": (
                    list(WEIGHT_PRESETS),
                    {
                        "tooltip": "Which layers take the image, as IPAdapter_plus names them: linear (all layers), "
                        "style transfer, composition."
                    },
                ),
                "start_percent": _float(0.0, 0.0, 1.0, 0.01, "The adapter acts from this point of the schedule on."),
                "end_percent": _float(
                    1.0, 0.0, 1.0, 0.01, "The adapter acts until this point; outside it the model is exactly the prior."
                ),
            },
            "optional": {
                "router": (
                    list(ROUTER_MODES),
                    {
                        "default": ATTENTION,
                        "tooltip": "From attention: each subject where the model draws its word. Personal everywhere: "
                        "IP-Adapter as usual (subjects blend). Prior everywhere: the plain model.",
                    },
                ),
                "router_warmup": _float(
                    0.2,
                    0.0,
                    0.9,
                    0.05,
                    "Fraction of the window before the router acts: the base model lays the scene out alone (its "
                    "attention makes the maps), then the subjects go where their words are.",
                ),
                "router_threshold": _float(
                    0.3,
                    0.0,
                    0.95,
                    0.05,
                    "A subject's map (0-1 of its peak) below this keeps the base model; higher: tighter regions.",
                ),
                "clip_vision": (
                    "CLIP_VISION",
                    {
                        "tooltip": "The CLIP ViT-H of MoA Subject: plus and full-face adapters give the negative "
                        "prompt the tokens of a black image, as IP-Adapter does."
                    },
                ),
                "record_router_maps": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Keep the router maps of each step for MoA Router Masks."},
                ),
                "sparse_threshold": _float(
                    DEFAULT_SPARSE_THRESHOLD,
                    0.0,
                    0.5,
                    0.005,
                    "Speed: pixels whose share is at most this keep the base model without running the expert.",
                ),
            },
        }

    @classmethod
    def apply(
        cls,
        model,
        ipadapter,
        clip,
        text,
        subject_words,
        subjects,
        weight,
        weight_type,
        start_percent,
        end_percent,
        router=ATTENTION,
        router_warmup=0.2,
        router_threshold=0.3,
        clip_vision=None,
        record_router_maps=True,
        sparse_threshold=DEFAULT_SPARSE_THRESHOLD,
    ):
        if has_moa(model):
            raise MoAError(f"{APPLY}.model: this model already has MoA applied; apply MoA once per model")
        words = parse_subject_words(subject_words, f"{APPLY}.subject_words")
        if len(words) != len(subjects):
            raise MoAError(
                f"{APPLY}.subject_words: {len(words)} word(s) for {len(subjects)} subject(s); give one word per "
                "subject, in the order the subjects were chained"
            )
        if start_percent > end_percent:
            raise MoAError(f"{APPLY}.start_percent: start is after end; the adapter would never act. Lower it")
        adapter = ipadapter.model
        paths = check_adapter_fits(model, adapter.spec, f"{APPLY}.ipadapter")
        outputs = check_subjects(subjects, adapter, f"{APPLY}.subjects")
        bound = bind_subject_words(clip, text, words, (f"{APPLY}.text", f"{APPLY}.subject_words"))
        negative = negative_output(adapter, clip_vision, f"{APPLY}.clip_vision")
        config = AttentionRouterConfig(warmup=router_warmup, threshold=router_threshold)
        record = RouterRecord(cross_attention_paths(model)) if record_router_maps else None
        options = {
            "weight": weight,
            "weight_type": weight_type,
            "start_percent": start_percent,
            "end_percent": end_percent,
            "router_mode": router,
            "router": config,
            "sparse_threshold": sparse_threshold,
            "input_name": f"{APPLY}.weight_type",
        }
        runtime = build_runtime(
            model, ipadapter, outputs, negative, bound.positions, bound.prompt_length, options, paths, record
        )
        patched = apply_ipadapter(model, runtime, f"{APPLY}.model")
        return (patched, clip.encode_from_tokens_scheduled(bound.tokens), record)
