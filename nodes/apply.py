"""MoA Apply: bind subjects to their words and patch the model's attention."""

import torch

from ..moa_core import ImageEncoderSpec, MoAError, PersonalPrompt, RouterMode, RouterRecord, WeightsMismatchError
from ..moa_core.region import check_region
from .host.patch import DEFAULT_SPARSE_THRESHOLD, MoAOptions, apply_moa
from .host.text import BoundPrompt, bind_subject_words, parse_subject_words
from .types import MOA_RECORD, MOA_SUBJECTS, MOA_WEIGHTS

ROUTER_MODES = [mode.value for mode in RouterMode]


class MoAApply:
    DESCRIPTION = (
        "Personalizes the model with MoA: every attention layer becomes a mixture of the frozen prior and a "
        "personal expert that sees each subject in its word, and a router decides per pixel. Use the "
        "CONDITIONING output as the sampler's positive; the record goes to MoA Router Masks."
    )
    CATEGORY = "MoA"
    RETURN_TYPES = ("MODEL", "CONDITIONING", MOA_RECORD)
    RETURN_NAMES = ("model", "positive", "router_record")
    OUTPUT_TOOLTIPS = (
        "The model with MoA in its attention layers.",
        "The prompt, encoded: the sampler's positive input (MoA binds the subjects to its tokens).",
        "Where the router sent each pixel, filled while sampling: for MoA Router Masks.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model (checkpoint, fine-tune, with LoRAs)."}),
                "moa_weights": (MOA_WEIGHTS, {"tooltip": "From MoA Loader."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes the prompt and finds the words."}),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "default": "a photo of a man at the beach",
                        "tooltip": "The prompt. Name every subject with its word; weights like (man:1.2) work.",
                    },
                ),
                "subject_words": (
                    "STRING",
                    {
                        "default": "man",
                        "tooltip": "One word (or phrase) per subject, comma-separated, in the order "
                        "of the subjects, e.g. 'man, woman'. Each must appear in the prompt.",
                    },
                ),
                "subjects": (MOA_SUBJECTS, {"tooltip": "From MoA Subject: one subject per word."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Scales the personal expert's share of every pixel; 0 gives the plain model.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "MoA acts from this point of the schedule on.",
                    },
                ),
                "end_percent": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "MoA acts until this point; outside the window the model is exactly the prior.",
                    },
                ),
            },
            "optional": {
                "router": (
                    ROUTER_MODES,
                    {
                        "default": RouterMode.LEARNED.value,
                        "tooltip": "The learned per-pixel router; 'from attention': each subject where the model "
                        "draws its word (no training); or one expert everywhere (for comparisons).",
                    },
                ),
                "record_router_maps": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Keep the router maps of each step for MoA Router Masks."},
                ),
                "region": (
                    "MASK",
                    {
                        "tooltip": "Where the subjects may appear: the personal expert's share is scaled by this mask, "
                        "so black keeps the plain model exactly (and costs nothing)."
                    },
                ),
                "sparse_threshold": (
                    "FLOAT",
                    {
                        "default": DEFAULT_SPARSE_THRESHOLD,
                        "min": 0.0,
                        "max": 0.5,
                        "step": 0.005,
                        "tooltip": "Speed: pixels whose personal share is at most this keep the prior without running "
                        "the personal expert (0: every pixel). Saves time on the CPU; a GPU at SD1.5 sizes waits on "
                        "launches, not maths, so there it gives the same image without the saving. The default "
                        "changes the image less than lowering strength by 0.05 does.",
                    },
                ),
                "uncond_rows": (
                    ["personal expert", "prior only"],
                    {
                        "tooltip": "Speed: 'prior only' skips the personal expert on the negative prompt's rows "
                        "(faster, but CFG then pushes harder towards the subject)."
                    },
                ),
            },
        }

    @classmethod
    def apply(
        cls,
        model,
        moa_weights,
        clip,
        text: str,
        subject_words: str,
        subjects,
        strength: float,
        start_percent: float,
        end_percent: float,
        router: str = RouterMode.LEARNED.value,
        record_router_maps: bool = True,
        region=None,
        sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD,
        uncond_rows: str = "personal expert",
    ):
        words = parse_subject_words(subject_words, "MoAApply.subject_words")
        if len(words) != len(subjects):
            raise MoAError(
                f"MoAApply.subject_words: {len(words)} word(s) for {len(subjects)} subject(s); give one word per "
                "subject, in the order the subjects were chained"
            )
        if start_percent > end_percent:
            raise MoAError("MoAApply.start_percent: start is after end; MoA would never act. Lower start_percent")
        weights = moa_weights.model
        check_encoder(subjects, weights.config.image_encoder)
        bound = bind_subject_words(clip, text, words, ("MoAApply.text", "MoAApply.subject_words"))
        record = RouterRecord(weights.paths) if record_router_maps else None
        region = None if region is None else check_region(region, "MoAApply.region")
        rows = "cond" if uncond_rows == "prior only" else "all"
        options = MoAOptions(strength, start_percent, end_percent, RouterMode(router), rows, sparse_threshold, region)
        prompt = personal_prompt(bound, subjects)
        patched = apply_moa(model, moa_weights, prompt, options, record, ("MoAApply.model", "MoAApply.moa_weights"))
        return (patched, clip.encode_from_tokens_scheduled(bound.tokens), record)


def check_encoder(subjects, expected: ImageEncoderSpec) -> None:
    for i, subject in enumerate(subjects):
        if subject.encoder_dim != expected.dim:
            raise WeightsMismatchError(
                f"MoAApply.subjects: subject {i + 1} was encoded by a CLIP vision model with {subject.encoder_dim}-d "
                f"embeddings; the MoA weights expect {expected.name} ({expected.dim}-d). Load that model in the "
                "CLIPVisionLoader that feeds MoA Subject"
            )


def personal_prompt(bound: BoundPrompt, subjects) -> PersonalPrompt:
    """Every token of subject i's word carries subject i."""
    positions = [p for word in bound.positions for p in word]
    owners = [i for i, word in enumerate(bound.positions) for _ in word]
    embeds = torch.stack([subject.embedding for subject in subjects])
    return PersonalPrompt.single(bound.prompt_length, positions, owners, embeds)
