"""Session fixtures of tiers 3 and 4: one real headless ComfyUI (main.py --cpu) with this pack and
generated model files, shared by the server tests and the browser tests.

Registered from tests/conftest.py (`pytest_plugins`); nothing starts unless a test asks for
`comfy_server`. The server is started the way the runner starts one (the pack offered from a
custom_nodes folder of its own), with --base-directory pointing at a temp folder whose models/ and
input/ hold the files the example workflows name.
"""

import socket
from pathlib import Path

import pytest

# The file names the example workflows use, and the generated files standing in for them.
MODEL_NAMES = {
    "checkpoints/v1-5-pruned-emaonly.safetensors": "sd15_checkpoint_file",
    "clip_vision/clip-vit-large-patch14.safetensors": "clip_vision_vitl_file",
    "moa/moa_sd15.safetensors": "moa_weights_file",
    "controlnet/control_v11p_sd15_openpose.safetensors": "sd15_controlnet_file",
    "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "clip_vision_vith_file",
    "ipadapter/ip-adapter-plus-face_sd15.safetensors": "ipadapter_plus_face_file",
    "checkpoints/sd_xl_base_1.0.safetensors": "sdxl_checkpoint_file",
    "moa/moa_sdxl.safetensors": "moa_sdxl_weights_file",
    "ipadapter/ip-adapter-plus-face_sdxl_vit-h.safetensors": "ipadapter_sdxl_plus_face_file",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_inputs(folder: Path) -> None:
    """The subject photos (synthetic faces the test insightface pack detects), a pose image, and the
    photo whose person the photo example replaces (256 px, the size the quick runs sample)."""
    import numpy as np
    from PIL import Image

    from moa_testing.model_files import draw_faces

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_faces(320, [(90, 70, 140)], seed=1)).save(folder / "moa_subject_man.png")
    Image.fromarray(draw_faces((300, 360), [(120, 60, 120)], seed=2)).save(folder / "moa_subject_woman.png")
    Image.fromarray(draw_faces(256, [(80, 50, 110)], seed=3)).save(folder / "moa_photo.png")
    pose = np.zeros((256, 256, 3), np.uint8)
    pose[40:220, 120:136] = 255
    Image.fromarray(pose).save(folder / "moa_pose.png")


@pytest.fixture(scope="session")
def base_directory(tmp_path_factory, request, insightface_root) -> Path:
    base = tmp_path_factory.mktemp("comfy_base")
    for name, fixture in MODEL_NAMES.items():
        target = base / "models" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(request.getfixturevalue(fixture))
    (base / "models" / "insightface").symlink_to(insightface_root, target_is_directory=True)
    write_inputs(base / "input")
    (base / "custom_nodes").mkdir()  # main.py lists it before loading any custom node
    return base


@pytest.fixture(scope="session")
def comfy_server(base_directory):
    from comfyui_moa.moa_runner.server import ComfyServer
    from moa_pack import ROOT, find_host

    args = ["--cpu", "--base-directory", str(base_directory), "--disable-api-nodes"]
    with ComfyServer.start(find_host(), ROOT, free_port(), args) as server:
        yield server


@pytest.fixture
def run_workflow(comfy_server, tmp_path):
    """run_workflow(workflow dict, *overrides) -> RunResult, through the runner's own functions."""
    import asyncio

    from comfyui_moa.moa_runner import run, workflow
    from moa_testing.quick import quick_for

    runs = iter(range(1000))

    def _run(ui: dict, *overrides: str):
        prompt = workflow.ui_to_api(ui, comfy_server.object_info())
        run.apply_overrides(prompt, [*quick_for(prompt), *overrides])
        out = tmp_path / f"run{next(runs)}"
        return asyncio.run(run.run_prompt(comfy_server.url, prompt, out, timeout=600))

    return _run
