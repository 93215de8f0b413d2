"""The evaluation's pictures: rows of (subject photo, prior, MoA, MoA's router mask over its image,
no router, fine-tune), each image the first seed of its cell, enlarged 4x with nearest pixels."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_moa.moa_core.render import overlay

from . import scenes

COLUMNS = ("photo", "prior", "moa", "router", "personal", "finetune")
TITLES = {"photo": "subject photo", "prior": "prior", "moa": "MoA", "router": "MoA router (r1)",
          "personal": "no router", "finetune": "fine-tune"}  # fmt: skip
ZOOM = 4
GAP = 2


def tile(images: dict, column: str) -> torch.Tensor | None:
    """The cell's picture for `column`, [32, 32, 3], or None when the run has none."""
    if column == "router":
        if "router" not in images or "moa" not in images:
            return None
        return overlay(images["moa"][:1], images["router"][:1])[0]
    picture = images.get(column)
    return None if picture is None else picture[0]


def rows_picture(rows: list[dict], columns: tuple[str, ...]) -> np.ndarray:
    """uint8 [H, W, 3]: one row per cell, white where a column has nothing."""
    side = scenes.SIZE * ZOOM
    step = side + GAP
    out = torch.ones(len(rows) * step - GAP, len(columns) * step - GAP, 3)
    for i, images in enumerate(rows):
        for j, column in enumerate(columns):
            picture = tile(images, column)
            if picture is None:
                continue
            big = F.interpolate(picture.permute(2, 0, 1)[None].float(), scale_factor=ZOOM, mode="nearest")[0]
            out[i * step : i * step + side, j * step : j * step + side] = big.permute(1, 2, 0)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_grids(out: Path, shown: dict) -> list[Path]:
    """single_subject.png (a cat and a dog identity on every background) and identities.png
    (every held-out identity on the first background); columns as COLUMNS, where present."""
    out.mkdir(parents=True, exist_ok=True)
    columns = tuple(c for c in COLUMNS if any(tile(images, c) is not None for images in shown.values()))
    chosen = [scenes.HELD_OUT[0], scenes.HELD_OUT[len(scenes.HELD_OUT) // 2]]
    first = [shown[(identity, background)] for identity in chosen for background in scenes.BACKGROUNDS]
    every = [shown[(identity, scenes.BACKGROUNDS[0])] for identity in scenes.HELD_OUT]
    paths = []
    for name, rows in (("single_subject.png", first), ("identities.png", every)):
        path = out / name
        Image.fromarray(rows_picture(rows, columns)).save(path)
        paths.append(path)
    (out / "columns.txt").write_text(", ".join(TITLES[c] for c in columns) + "\n")
    return paths
