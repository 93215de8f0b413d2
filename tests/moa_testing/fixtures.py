"""Session fixtures: the model files of moa_testing.model_files, each written once per test session.

Registered from tests/conftest.py (`pytest_plugins`), so every tier sees them, but nothing is written
and comfy is not imported unless a test asks for one. The files sit in a models folder laid out as
ComfyUI's (`checkpoints/`, `controlnet/`, `clip_vision/`, `moa/`, `insightface/models/<pack>/`), so a
headless server can be pointed at `model_files_dir` with --extra-model-paths-config. The big files are
deleted when the session ends (pytest keeps its last 3 temp folders: ~1 GB each otherwise).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

INSIGHTFACE_PACK = "antelopev2"
"""Name of the synthetic insightface pack under `insightface_root / "models"`."""


@pytest.fixture(scope="session")
def model_files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's models folder."""
    return tmp_path_factory.mktemp("models")


def _written(path: Path) -> Iterator[Path]:
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def sd15_checkpoint_file(model_files_dir: Path) -> Iterator[Path]:
    """checkpoints/moa_test_sd15.safetensors: write_sd15_checkpoint, detected as SD15 (303 MB, ~1.5 s)."""
    from moa_testing.model_files import write_sd15_checkpoint

    yield from _written(write_sd15_checkpoint(model_files_dir / "checkpoints" / "moa_test_sd15.safetensors"))


@pytest.fixture(scope="session")
def sdxl_checkpoint_file(model_files_dir: Path) -> Iterator[Path]:
    """checkpoints/moa_test_sdxl.safetensors: write_sdxl_checkpoint, detected as SDXL (2.2 GB, ~25 s)."""
    from moa_testing.model_files import write_sdxl_checkpoint

    yield from _written(write_sdxl_checkpoint(model_files_dir / "checkpoints" / "moa_test_sdxl.safetensors"))


@pytest.fixture(scope="session")
def sd15_controlnet_file(model_files_dir: Path) -> Iterator[Path]:
    """controlnet/moa_test_sd15_control.safetensors: a ControlNet for sd15_checkpoint_file (31 MB, ~0.1 s)."""
    from moa_testing.model_files import write_sd15_controlnet

    yield from _written(write_sd15_controlnet(model_files_dir / "controlnet" / "moa_test_sd15_control.safetensors"))


@pytest.fixture(scope="session")
def clip_vision_vitl_file(model_files_dir: Path) -> Iterator[Path]:
    """clip_vision/moa_test_vitl.safetensors: a random CLIP ViT-L/14 (608 MB, ~2.5 s; encoding an
    image takes 2.5-4 s on 2 cores)."""
    from moa_testing.model_files import write_clip_vision_vitl

    yield from _written(write_clip_vision_vitl(model_files_dir / "clip_vision" / "moa_test_vitl.safetensors"))


@pytest.fixture(scope="session")
def insightface_root(model_files_dir: Path) -> Path:
    """insightface/: the `root` for `FaceAnalysis(name=INSIGHTFACE_PACK, root=...)`, holding the synthetic
    pack of write_insightface_pack (0.7 MB, ~0.3 s). Its faces are moa_testing.model_files.draw_faces' squares."""
    from moa_testing.model_files import write_insightface_pack

    root = model_files_dir / "insightface"
    write_insightface_pack(root, INSIGHTFACE_PACK)
    return root


@pytest.fixture(scope="session")
def moa_weights_file(model_files_dir: Path, sd15_checkpoint_file: Path) -> Iterator[Path]:
    """moa/moa_test_sd15.safetensors: MoA weights for sd15_checkpoint_file's UNet, every part random
    (seed 7) as if trained, with a fuser strong enough that subjects of the random CLIP ViT-L (whose
    embeddings of different images are 0.999 alike) still draw different pictures."""
    import comfy.sd

    from moa_testing.model_files import write_moa_weights

    model = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint_file), output_vae=False, output_clip=False)[0]
    yield from _written(
        write_moa_weights(model_files_dir / "moa" / "moa_test_sd15.safetensors", model, seed=7, fuser_std=1.0)
    )


@pytest.fixture(scope="session")
def moa_sdxl_weights_file(model_files_dir: Path, sdxl_checkpoint_file: Path) -> Iterator[Path]:
    """moa/moa_test_sdxl.safetensors: as moa_weights_file, for sdxl_checkpoint_file's UNet (140 layers)."""
    import comfy.sd

    from moa_testing.model_files import write_moa_weights

    model = comfy.sd.load_checkpoint_guess_config(str(sdxl_checkpoint_file), output_vae=False, output_clip=False)[0]
    yield from _written(
        write_moa_weights(model_files_dir / "moa" / "moa_test_sdxl.safetensors", model, seed=7, fuser_std=1.0)
    )


@pytest.fixture(scope="session")
def clip_vision_vith_file(model_files_dir: Path) -> Iterator[Path]:
    """clip_vision/moa_test_vith.safetensors: a random CLIP ViT-H/14, the encoder of SD1.5's IP-Adapters (1.26 GB)."""
    from moa_testing.ipadapter_files import write_clip_vision_vith

    yield from _written(write_clip_vision_vith(model_files_dir / "clip_vision" / "moa_test_vith.safetensors"))


@pytest.fixture(scope="session")
def ipadapter_plus_face_file(model_files_dir: Path, sd15_checkpoint_file: Path) -> Iterator[Path]:
    """ipadapter/moa_test_plus_face.safetensors: an ip-adapter-plus-face layout for sd15_checkpoint_file's UNet."""
    from moa_testing.ipadapter_files import write_ipadapter_for_checkpoint

    path = model_files_dir / "ipadapter" / "moa_test_plus_face.safetensors"
    yield from _written(write_ipadapter_for_checkpoint(path, sd15_checkpoint_file))


@pytest.fixture(scope="session")
def ipadapter_sdxl_plus_face_file(model_files_dir: Path, sdxl_checkpoint_file: Path) -> Iterator[Path]:
    """ipadapter/moa_test_sdxl_plus_face.safetensors: the same for sdxl_checkpoint_file's 70 layers (2048-d text)."""
    from moa_testing.ipadapter_files import write_ipadapter_for_checkpoint

    path = model_files_dir / "ipadapter" / "moa_test_sdxl_plus_face.safetensors"
    yield from _written(write_ipadapter_for_checkpoint(path, sdxl_checkpoint_file))
