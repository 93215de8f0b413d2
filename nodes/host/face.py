"""Face detection and alignment with insightface, imported lazily so the pack loads without it."""

from dataclasses import dataclass

import torch

from ...moa_core import MoAError
from ...moa_core.align import similarity_transform, template_in_canvas, warp_affine
from .folders import insightface_root

PROVIDERS = ("CPU", "CUDA", "ROCM", "CoreML")
MODEL_PACKS = ("antelopev2", "buffalo_l")
CROP_SIZE = 224
_DETECTION_SIZES = (640, 512, 384, 256)  # small faces are found at large sizes, large ones at small


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    landmarks: torch.Tensor  # [5, 2]: eyes, nose, mouth corners

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def load_face_analysis(pack: str, provider: str):
    """insightface's FaceAnalysis for models/insightface/models/<pack>, never downloading."""
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise MoAError(
            "MoAInsightFaceLoader: insightface is not installed. Install it into ComfyUI's Python with "
            "`pip install insightface onnxruntime` (onnxruntime-gpu for CUDA) and restart ComfyUI"
        ) from None
    root = insightface_root()
    folder = root / "models" / pack
    if not list(folder.glob("*.onnx")):
        nested = list(folder.glob("*/*.onnx"))
        hint = f" It holds a folder {nested[0].parent.name}/: move its .onnx files up one level." if nested else ""
        raise MoAError(
            f"MoAInsightFaceLoader.model_pack: no InsightFace model pack '{pack}' at {folder}.{hint} "
            f"Unzip {pack}.zip so that its .onnx files sit directly in that folder, e.g. "
            f"{folder}/scrfd_10g_bnkps.onnx for antelopev2 or {folder}/det_10g.onnx for buffalo_l"
        )
    app = FaceAnalysis(name=pack, root=str(root), providers=[f"{provider}ExecutionProvider"])
    app.prepare(ctx_id=-1 if provider == "CPU" else 0, det_size=(_DETECTION_SIZES[0],) * 2)
    return app


def detect_faces(face_analysis, image: torch.Tensor) -> list[Face]:
    """Faces in image [H, W, 3] (0..1 RGB), trying smaller detection sizes when none is found."""
    bgr = (image[..., [2, 1, 0]].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for size in _DETECTION_SIZES:
        boxes, landmarks = face_analysis.det_model.detect(bgr, input_size=(size, size))
        if len(boxes):
            return [
                Face(tuple(float(v) for v in box[:4]), torch.from_numpy(points).float())
                for box, points in zip(boxes, landmarks, strict=True)
            ]
    return []


def align_face(image: torch.Tensor, face: Face, margin: float) -> torch.Tensor:
    """The face of image [H, W, 3] rotated upright and scaled onto the ArcFace template, with
    `margin` (fraction of the face) of context around it: [224, 224, 3]."""
    from insightface.utils.face_align import arcface_dst

    template = template_in_canvas(torch.from_numpy(arcface_dst).float(), 112.0, CROP_SIZE, margin)
    return warp_affine(image, similarity_transform(face.landmarks, template), CROP_SIZE)
