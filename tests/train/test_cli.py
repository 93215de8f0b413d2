"""`python -m moa_train --config cfg.toml`: model files through ComfyUI's own loaders, end to end."""

import os
import subprocess
import sys
from pathlib import Path

from comfyui_moa.moa_core import load_weights
from moa_testing.training import proof_settings, write_toml

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the cores are shared with other test runs
    return subprocess.run(
        [sys.executable, "-m", "moa_train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_trains_from_a_checkpoint_and_a_clip_vision_file(
    sd15_checkpoint_file, clip_vision_vitl_file, data_dirs, tmp_path
):
    """The small SD1.5 checkpoint (full CLIP-L text encoder, TAESD) and a ViT-L/14 CLIP vision file,
    loaded as ComfyUI loads them; two steps of one 64 px sample, a preview at the end."""
    train, _ = data_dirs
    settings = proof_settings(
        train,
        Path("out"),  # relative: resolved against the config file's folder
        data={"resolution": 64, "subject_resolution": 224, "max_subjects": 1},
        optim={"batch_size": 1},
        run={"steps": 2, "preview_every": 2, "preview_steps": 2, "progress": True},
        model={"checkpoint": str(sd15_checkpoint_file), "clip_vision": str(clip_vision_vitl_file)},
    )
    config = write_toml(tmp_path / "cfg.toml", settings)
    done = cli("--config", str(config))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "wrote" in done.stdout and "step" in done.stderr  # the summary, and tqdm's bar on stderr
    weights = load_weights(tmp_path / "out" / "moa_sd15.safetensors")
    assert weights.config.training["base_model"] == sd15_checkpoint_file.name
    assert weights.config.training["image_encoder_file"] == clip_vision_vitl_file.name
    assert weights.config.image_encoder.dim == 768 and len(weights.paths) == 8
    assert (tmp_path / "out" / "previews" / "step_00000002.png").is_file()
    assert len((tmp_path / "out" / "log.csv").read_text().splitlines()) == 3


def test_cli_reports_a_bad_config_in_one_line_without_a_traceback(tmp_path):
    config = tmp_path / "cfg.toml"
    config.write_text('[optim]\nlr_routers = "fast"\n')
    done = cli("--config", str(config), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: cfg.toml [optim] lr_routers: expected float, found 'fast'"
