"""One process of test_distributed.py's torchrun: the proof's tiny models, trained as the TOML file says.

Usage: torchrun --nproc_per_node N tests/train/ddp_worker.py CONFIG.toml MODELS_FOLDER
"""

import os
import sys
from pathlib import Path

import moa_pack

moa_pack.load()
moa_pack.use_host(cpu=True)

import torch  # noqa: E402 (after the host is set up for the CPU)

from moa_testing.training import proof_models  # noqa: E402
from moa_train.config import TrainConfig  # noqa: E402
from moa_train.run import run  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    config_path, models_folder = sys.argv[1:3]
    folder = Path(models_folder) / f"rank{os.environ['RANK']}"  # the tiny CLIP vision's config file, per process
    folder.mkdir(parents=True, exist_ok=True)
    run(TrainConfig.from_toml(config_path), proof_models(folder))
