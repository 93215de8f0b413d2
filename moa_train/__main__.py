"""`python -m moa_train --config cfg.toml [--resume latest|FILE]`, from the repository root.

Several processes: `torchrun --nproc_per_node 8 -m moa_train --config cfg.toml` (docs/training.md).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

import moa_pack
from comfyui_moa.moa_core.errors import MoAError

from .config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_train", description="Train MoA weights for ComfyUI-MoA.")
    parser.add_argument("--config", required=True, type=Path, help="the run's TOML file (docs/training.md)")
    parser.add_argument("--resume", help='"latest" or a checkpoint file; overrides [run] resume')
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )
    try:
        config = TrainConfig.from_toml(args.config)
        if args.resume is not None:
            resume = args.resume if args.resume == "latest" else str(Path(args.resume).resolve())
            config = config.replace("run", resume=resume)
    except MoAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())
    if gpu:
        # before ComfyUI's model management first looks at the device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    moa_pack.use_host(cpu=not gpu)
    if gpu:
        import comfy.cli_args

        comfy.cli_args.args.highvram = True  # keep every model on the GPU: training touches them all each step
    from .run import run

    try:
        result = run(config)
    except MoAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        last = result.history[-1] if result.history else {}
        print(f"wrote {result.weights_path} after {result.steps} steps ({result.skipped} samples skipped)")
        if last:
            print("last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
