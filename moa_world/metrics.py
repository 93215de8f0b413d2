"""The evaluation's figures, in plain torch: accuracies, pixel change outside a subject, router IoU.

Images are IMAGE [b, H, W, 3] in [0, 1]; masks are float or bool [b, H, W] (1: subject).
"""

import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IOU_THRESHOLD = 0.5
"""A router map pixel counts as the personal expert's where r1 is above this."""

DILATE = 1
"""Pixels of margin around a subject's mask that do not count as outside it: a sample's own subject
edge and a judge's segmentation error both move by about a pixel at 32 px."""


def accuracy(predicted: torch.Tensor, wanted: torch.Tensor) -> float:
    """Share of predictions [n] equal to the wanted labels [n]."""
    return float((predicted.reshape(-1) == wanted.reshape(-1)).float().mean()) if predicted.numel() else float("nan")


def dilate(masks: torch.Tensor, pixels: int = DILATE) -> torch.Tensor:
    """masks [b, H, W] grown by `pixels` in every direction (bool)."""
    masks = masks.float()[:, None]
    if pixels:
        masks = F.max_pool2d(masks, 2 * pixels + 1, stride=1, padding=pixels)
    return masks[:, 0] > 0.5


def outside_change(a: torch.Tensor, b: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
    """Per image [b]: the mean absolute pixel change between images a and b [b, H, W, 3] over the
    pixels outside `subjects` [b, H, W] (the union of both images' subject masks, dilated)."""
    outside = (~dilate(subjects)).float()[..., None]
    change = (a.float() - b.float()).abs() * outside
    return change.sum((1, 2, 3)) / (3 * outside.sum((1, 2, 3))).clamp(min=1.0)


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image [b]: ||estimate - target|| / ||target|| (latents or images, batch first)."""
    return (estimate - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)


def inside_change(a: torch.Tensor, b: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
    """Per image [b]: the mean absolute pixel change between images a and b over the pixels of `subjects`."""
    inside = subjects.float()[..., None]
    return ((a.float() - b.float()).abs() * inside).sum((1, 2, 3)) / (3 * inside.sum((1, 2, 3))).clamp(min=1.0)


def iou(maps: torch.Tensor, masks: torch.Tensor, threshold: float = IOU_THRESHOLD) -> torch.Tensor:
    """Per image [b]: intersection over union of the router maps [b, h, w] above `threshold` and
    the subject masks [b, H, W] (the maps resized to the masks' size). Two empty sets give 1."""
    resized = F.interpolate(maps.float()[:, None], size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
    routed = resized[:, 0] > threshold
    subject = masks > 0.5
    inter = (routed & subject).sum((1, 2)).float()
    union = (routed | subject).sum((1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def spread(values: Sequence[float]) -> str:
    """'mean ± sd (min-max)' over seeds; the value alone for one seed."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table_lines(runs: Sequence[dict], rows: Sequence[tuple[str, str]], targets: dict | None = None) -> list[str]:
    """Markdown rows: per (label, key) of `rows` present in some run, its spread over runs (and its target)."""
    plural = "s" * (len(runs) > 1)
    lines = [f"| figure | value ({len(runs)} run{plural}) |", "|---|---|"]
    if targets is not None:
        lines = [lines[0] + " target |", lines[1] + "---|"]
    for label, key in rows:
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            target = "" if targets is None else f" {targets.get(key, '')} |"
            lines.append(f"| {label} | {spread(values)} |{target}")
    return lines
