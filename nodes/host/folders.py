"""Model folders: models/moa for MoA weights, models/insightface for InsightFace model packs.

Registered so that extra_model_paths.yaml (applied before custom nodes load) can move them.
"""

import os
from pathlib import Path

import folder_paths

MOA = "moa"
INSIGHTFACE = "insightface"


def register() -> None:
    for name, extensions in ((MOA, {".safetensors"}), (INSIGHTFACE, set())):
        if name in folder_paths.folder_names_and_paths:
            paths, _ = folder_paths.folder_names_and_paths[name]
            folder_paths.folder_names_and_paths[name] = (paths, extensions)
        else:
            folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], extensions)


def insightface_root() -> Path:
    """The folder FaceAnalysis reads packs from, as root/models/<pack>/."""
    return Path(folder_paths.get_folder_paths(INSIGHTFACE)[0])
