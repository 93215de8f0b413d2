"""Several processes through torchrun and DistributedDataParallel (gloo on the CPU) train the same
weights as one process on the same global batch."""

import logging
import os
import subprocess
import sys
from pathlib import Path

from comfyui_moa.moa_core import load_weights
from moa_testing.training import proof_settings, write_toml

logger = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]
STEPS = 4
RELATIVE_TOLERANCE = 1e-5
"""Of how far the weights moved: float32 sums run in another order (batches of 2 per process, and
DDP's all-reduce, against one batch of 4). Both runs use Adam with eps 1e-3 (its default is 1e-8):
where the router loss's two halves balance, a router weight's gradient is near zero, and Adam with a
tiny eps turns the rounding of such a gradient into a step of the full learning rate either way (with
eps 1e-8 the largest difference was 0.025 of 0.05 moved, on router weights only; with 1e-3, 4.5e-8 of
0.068)."""


def test_two_processes_train_like_one_on_the_same_global_batch(models, data_dirs, tmp_path):
    from moa_train.config import TrainConfig
    from moa_train.models import build_weights
    from moa_train.run import run

    train, _ = data_dirs

    def settings(output: Path, **optim) -> dict:
        return proof_settings(train, output, optim={"eps": 1e-3, **optim}, run={"steps": STEPS})

    config = write_toml(tmp_path / "two.toml", settings(tmp_path / "two", batch_size=2))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(WORKER), str(config), str(tmp_path / "models")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    one = run(TrainConfig.from_dict(settings(tmp_path / "one")), models)
    ones, twos = load_weights(one.weights_path), load_weights(tmp_path / "two" / "moa_sd15.safetensors")
    assert ones.config.training["global_batch"] == twos.config.training["global_batch"] == 4
    trained, distributed = ones.file_state_dict(), twos.file_state_dict()
    difference = max(float((trained[k] - distributed[k]).abs().max()) for k in trained)
    untrained = build_weights(TrainConfig.from_dict(proof_settings(train, tmp_path)), models).file_state_dict()
    moved = max(float((trained[k] - untrained[k]).abs().max()) for k in trained)
    logger.info(
        "1 vs 2 processes: max weight difference %.3g after %d steps (weights moved %.3g)", difference, STEPS, moved
    )
    assert difference < RELATIVE_TOLERANCE * moved, (difference, moved)
