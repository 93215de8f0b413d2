"""The trainer's tests: tiny models in-process, a synthetic dataset, and one proof run they share."""

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moa_testing.synthetic import write_dataset
from moa_testing.training import host_tensors, proof_models, proof_run, proof_settings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread: these tests share 2 cores with other test runs, and thread pools that
    fight over them make each training step about 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, held-out): 48 synthetic samples plus two broken ones, and 8 others."""
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root / "train", 48, seed=0, bad=True), write_dataset(root / "held_out", 8, seed=1)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory):
    return proof_models(tmp_path_factory.mktemp("tiny_models"))


@dataclass(frozen=True)
class Proof:
    config: object  # TrainConfig
    result: object  # RunResult
    host_before: dict[str, torch.Tensor]
    held_out_before: dict  # evaluate() of the untrained weights
    held_out_after: dict  # ... and of the trained ones
    seconds: float  # wall time of the run


@pytest.fixture(scope="session")
def proof(models, data_dirs, tmp_path_factory: pytest.TempPathFactory) -> Proof:
    """The proof run: 120 steps on the synthetic data, evaluated on held-out samples before and after."""
    from moa_train.config import TrainConfig

    train, held_out = data_dirs
    output = tmp_path_factory.mktemp("proof")
    config = TrainConfig.from_dict(proof_settings(train, output, run={"preview_every": 120, "preview_steps": 3}))
    with single_thread():
        host_before = host_tensors(models)
        before, result, seconds, after = proof_run(config, models, held_out)
    logger.info(
        "proof run: %d steps in %.1f s (%.2f steps/s in steps); held out before %s; after %s",
        config.run.steps, seconds, config.run.steps / result.train_seconds, before, after,
    )  # fmt: skip
    return Proof(config, result, host_before, before, after, seconds)
