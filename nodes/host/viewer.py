"""The router viewer's files and their description (web/moa_router_viewer.js reads both).

The atlases go to ComfyUI's temp folder, as PreviewImage's pictures do, and the core /view route
serves them: no route of our own reads files. The description travels in the node's ui output under
UI_KEY, so the frontend hands it to the node's onExecuted, also when the node's result was cached.
"""

import os

import folder_paths
import torch
from PIL import Image

from ...moa_core import atlas
from ...moa_core.record import RouterRecord
from ...moa_core.render import colormap_stops

UI_KEY = "moa_router_viewer"
VERSION = 1  # of the description below; the viewer says so when it gets another


def publish(
    record: RouterRecord, group: str, batch: int, latent_hw: tuple[int, int], image: torch.Tensor | None
) -> dict:
    """Write the atlases of the last run and return their description:

    version, steps, sigmas [steps + 1], acted [steps], batch, group (where the viewer starts),
    tile [h, w], columns, groups {name: file}, size [h, w] (the canvas), pictures (file, count,
    columns) or None, colormap (anchors, colours, alpha). A file is {filename, subfolder, type} for /view.
    """
    size = tuple(image.shape[1:3]) if image is not None else (latent_hw[0] * 8, latent_hw[1] * 8)
    tile = atlas.fit(latent_hw, atlas.TILE_SIDE)
    steps = len(record.sigmas) - 1
    columns = atlas.atlas_columns(batch * steps)
    maps = atlas.group_step_maps(record, tile, batch)
    files = _writer()
    description = {
        "version": VERSION,
        "steps": steps,
        "sigmas": list(record.sigmas),
        "acted": atlas.acted_steps(record),
        "batch": batch,
        "group": group if group in maps else next(iter(maps)),
        "tile": list(tile),
        "columns": columns,
        "groups": {name: files(pixels, name) for name, pixels in atlas.map_atlases(maps, columns).items()},
        "size": list(atlas.fit(size, atlas.PICTURE_SIDE)),
        "pictures": None,
        "colormap": colormap_stops(),
    }
    if image is not None:
        shown = image[:batch].cpu()
        picture_columns = atlas.atlas_columns(shown.shape[0])
        pictures = atlas.picture_atlas(shown, tuple(description["size"]), picture_columns)
        description["pictures"] = {**files(pictures, "image"), "count": shown.shape[0], "columns": picture_columns}
    return description


def _writer():
    """files(uint8 [H, W] or [H, W, 3], name) -> {filename, subfolder, type}: one numbered set of PNGs per run."""
    temp = folder_paths.get_temp_directory()
    folder, prefix, counter, subfolder, _ = folder_paths.get_save_image_path("MoA_router", temp)
    os.makedirs(folder, exist_ok=True)

    def files(pixels: torch.Tensor, name: str) -> dict:
        filename = f"{prefix}_{counter:05}_{name}.png"
        # compress_level 1: these are temporary and written on every run; size differs little for 8-bit maps
        Image.fromarray(pixels.numpy()).save(os.path.join(folder, filename), compress_level=1)
        return {"filename": filename, "subfolder": subfolder, "type": "temp"}

    return files
