"""Subjects: reference images -> subject embeddings (with optional face crop), and blends of two."""

import comfy.utils
import torch

from ..moa_core import MoAError
from ..moa_core.subject import blank_background, blend_subjects, to_rgb
from .host.face import align_face, detect_faces
from .host.vision import center_square, encode_subject, masked_squares
from .types import INSIGHTFACE, MOA_SUBJECTS

LARGEST, EVERY = "largest face", "every face, left to right"


class MoASubject:
    DESCRIPTION = (
        "Encodes reference images of a subject with CLIP vision. With face analysis connected the face is "
        "found, aligned and cropped; a batch of images is one subject (their embeddings are averaged), or "
        "every face of one image becomes its own subject. Chain subjects to bind several words."
    )
    CATEGORY = "MoA"
    RETURN_TYPES = (MOA_SUBJECTS, "IMAGE")
    RETURN_NAMES = ("subjects", "crops")
    OUTPUT_TOOLTIPS = ("Earlier subjects plus the new ones, in order.", "What CLIP vision saw, one crop per image.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Reference photo(s) of the subject; any size, RGB, RGBA or grey."}),
                "clip_vision": (
                    "CLIP_VISION",
                    {"tooltip": "From the CLIPVisionLoader: CLIP ViT-L/14 for MoA weights, ViT-H/14 for IP-Adapters."},
                ),
                "faces": (
                    [LARGEST, EVERY],
                    {
                        "tooltip": "With face analysis: crop each image's largest face (one subject), or turn every "
                        "face of a single image into its own subject, left to right."
                    },
                ),
                "margin": (
                    "FLOAT",
                    {
                        "default": 0.3,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "Context kept around an aligned face, as a fraction of the face.",
                    },
                ),
            },
            "optional": {
                "face_analysis": (
                    INSIGHTFACE,
                    {
                        "tooltip": "Finds and aligns faces; without it each image's centre square (or, with a mask, "
                        "the masked subject) is encoded."
                    },
                ),
                "mask": (
                    "MASK",
                    {
                        "tooltip": "White where the subject is: the rest is blanked and, without face analysis, the "
                        "image cut to the subject and padded square, as the weights were trained."
                    },
                ),
                "subjects": (MOA_SUBJECTS, {"tooltip": "Subjects from another MoA Subject: the new ones follow them."}),
            },
        }

    @classmethod
    def encode(cls, image, clip_vision, faces, margin, face_analysis=None, mask=None, subjects=()):
        images = to_rgb(image, "MoASubject.image")
        if mask is not None and mask.ndim == 3 and mask.shape[0] not in (1, images.shape[0]):
            raise MoAError(
                f"MoASubject.mask: {mask.shape[0]} masks for {images.shape[0]} images; give one mask, or one per image"
            )
        if face_analysis is None:
            if faces == EVERY:
                raise MoAError("MoASubject.faces: 'every face' needs face_analysis; connect MoA InsightFace Loader")
            crops = [center_square(images) if mask is None else masked_squares(images, mask, "MoASubject.mask")]
        else:
            if mask is not None:
                images = blank_background(images, mask)
            crops = cls._face_crops(images, face_analysis, faces, margin)
        progress = comfy.utils.ProgressBar(len(crops))
        new = []
        for group in crops:
            new.append(encode_subject(clip_vision, group, "MoASubject.clip_vision"))
            progress.update(1)
        return (tuple(subjects) + tuple(new), torch.cat(crops))

    @staticmethod
    def _face_crops(images, face_analysis, faces, margin) -> list[torch.Tensor]:
        """Crops grouped by subject: [all images' largest faces] or [[face 1], [face 2], ...]."""
        if faces == EVERY and images.shape[0] != 1:
            raise MoAError(f"MoASubject.image: 'every face' takes one image, got a batch of {images.shape[0]}")
        found = []
        for i, picture in enumerate(images):
            detected = detect_faces(face_analysis, picture)
            if not detected:
                where = f"image {i + 1} of {images.shape[0]}" if images.shape[0] > 1 else "the image"
                raise MoAError(
                    f"MoASubject.image: no face found in {where}; use a photo where the face is clearly visible, "
                    "or disconnect face_analysis to encode the whole image"
                )
            found.append((picture, detected))
        if faces == EVERY:
            picture, detected = found[0]
            ordered = sorted(detected, key=lambda face: face.box[0])
            return [align_face(picture, face, margin)[None] for face in ordered]
        return [torch.stack([align_face(p, max(d, key=lambda face: face.area), margin) for p, d in found])]


class MoASubjectBlend:
    DESCRIPTION = (
        "Morphs between two subjects: each subject of A is blended with the subject of B at the same "
        "position (the paper's subject morphing). With a fixed seed the context stays while the identity moves."
    )
    CATEGORY = "MoA"
    RETURN_TYPES = (MOA_SUBJECTS,)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The blended subjects.",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subjects_a": (MOA_SUBJECTS, {"tooltip": "Where the blend starts (factor 0)."}),
                "subjects_b": (MOA_SUBJECTS, {"tooltip": "Where the blend ends (factor 1); as many subjects as A."}),
                "factor": (
                    "FLOAT",
                    {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "0 is A, 1 is B."},
                ),
            }
        }

    @classmethod
    def blend(cls, subjects_a, subjects_b, factor):
        if len(subjects_a) != len(subjects_b):
            raise MoAError(
                f"MoASubjectBlend.subjects_b: A has {len(subjects_a)} subjects and B {len(subjects_b)}; "
                "blend sets with the same number of subjects"
            )
        return (tuple(blend_subjects(a, b, factor) for a, b in zip(subjects_a, subjects_b, strict=True)),)
