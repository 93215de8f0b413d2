"""Model folders: models/moa for MoA weights, models/insightface for InsightFace model packs,
models/ipadapter for IP-Adapter files (the folder ComfyUI_IPAdapter_plus uses; .bin files are listed
so that picking one says how to convert it).

Registered so that extra_model_paths.yaml (applied before custom nodes load) can move them.
"""

import os
from pathlib import Path

import folder_paths

MOA = "moa"
INSIGHTFACE = "insightface"
IPADAPTER = "ipadapter"
SHIPPED_MOA = Path(__file__).resolve().parents[2] / "moa_world" / "assets" / "moa"
"""The MoA weights trained on the small world's shipped prior (the demo's): listed in every ComfyUI."""


def register() -> None:
    for name, extensions in ((MOA, {".safetensors"}), (INSIGHTFACE, set()), (IPADAPTER, {".safetensors", ".bin"})):
        if name in folder_paths.folder_names_and_paths:
            paths, theirs = folder_paths.folder_names_and_paths[name]
            if name == IPADAPTER:  # shared with ComfyUI_IPAdapter_plus: keep what it lists too
                extensions = extensions | set(theirs)
            folder_paths.folder_names_and_paths[name] = (paths, extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], extensions)
    moa_paths = folder_paths.folder_names_and_paths[MOA][0]
    if SHIPPED_MOA.is_dir() and str(SHIPPED_MOA) not in moa_paths:
        moa_paths.append(str(SHIPPED_MOA))  # after the user's folders: their files come first


def insightface_root() -> Path:
    """The folder FaceAnalysis reads packs from, as root/models/<pack>/."""
    return Path(folder_paths.get_folder_paths(INSIGHTFACE)[0])
