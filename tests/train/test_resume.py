"""Checkpoints and exact resume: stopping and resuming trains the same weights, bit for bit."""

import shutil

import pytest
import torch

from comfyui_moa.moa_core import ConfigError, load_weights
from moa_testing.training import proof_settings

STEPS = 6


def settings(train, output, **run):
    # two-step gradient accumulation, dropout and augmentation on: all of it must resume exactly
    return proof_settings(
        train, output, optim={"batch_size": 2, "grad_accum": 2}, run={"steps": STEPS, "save_every": 3, **run}
    )


def test_resuming_from_a_checkpoint_gives_the_same_weights_as_not_stopping(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.run import run

    train, _ = data_dirs
    straight = run(TrainConfig.from_dict(settings(train, tmp_path / "straight")), models)
    stopped = run(TrainConfig.from_dict(settings(train, tmp_path / "stopped", steps=3)), models)
    assert stopped.steps == 3
    resumed = run(TrainConfig.from_dict(settings(train, tmp_path / "stopped", resume="latest")), models)
    a, b = load_weights(straight.weights_path), load_weights(resumed.weights_path)
    for (name, x), (_, y) in zip(a.file_state_dict().items(), b.file_state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[3:]]
    log = (tmp_path / "stopped" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + STEPS  # header, then each step once


def test_resume_refuses_a_checkpoint_trained_with_other_settings(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.run import run

    train, _ = data_dirs
    run(TrainConfig.from_dict(settings(train, tmp_path / "a", steps=3)), models)
    changed = settings(train, tmp_path / "a", resume="latest")
    changed["optim"]["lr_routers"] = 0.5
    with pytest.raises(ConfigError, match="lr_routers|optim"):
        run(TrainConfig.from_dict(changed), models)


def test_resume_latest_without_a_checkpoint_is_an_error_not_a_fresh_start(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.run import run

    train, _ = data_dirs
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(TrainConfig.from_dict(settings(train, tmp_path / "empty", resume="latest")), models)
    assert not (tmp_path / "empty" / "log.csv").exists()


def test_only_the_newest_checkpoints_are_kept(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.run import run

    train, _ = data_dirs
    run(TrainConfig.from_dict(settings(train, tmp_path / "k", steps=4, save_every=1, keep_checkpoints=2)), models)
    kept = sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir())
    assert kept == ["step_00000003.safetensors", "step_00000004.safetensors"]
    shutil.rmtree(tmp_path / "k")


def test_loading_data_in_worker_processes_trains_the_same_weights(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.run import run

    train, _ = data_dirs
    runs = [
        run(
            TrainConfig.from_dict(proof_settings(train, tmp_path / str(n), data={"workers": n}, run={"steps": 3})),
            models,
        )
        for n in (0, 2)
    ]
    here, workers = (load_weights(r.weights_path).file_state_dict() for r in runs)
    assert all(torch.equal(here[k], workers[k]) for k in here)
