"""The trainer's proof run (tests/train's, 120 steps on synthetic subjects) on whatever device is
there: a GPU trains in bf16 autocast, which the CPU tests cannot check. Prints the held-out metrics
before and after and exits 1 unless the routers learn the masks as the CPU test requires.

    python tests/train/proof_on_device.py [--steps 120]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import moa_pack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    import torch

    moa_pack.load()
    moa_pack.use_host(cpu=not torch.cuda.is_available())

    from comfyui_moa.moa_core import load_weights
    from moa_testing.synthetic import write_dataset
    from moa_testing.training import proof_models, proof_settings
    from moa_train.config import TrainConfig
    from moa_train.evaluate import evaluate
    from moa_train.models import build_weights
    from moa_train.run import run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="moa-proof-") as tmp:
        root = Path(tmp)
        train, held_out = write_dataset(root / "train", 48, seed=0), write_dataset(root / "held_out", 8, seed=1)
        (root / "models").mkdir()
        models = proof_models(root / "models")
        config = TrainConfig.from_dict(proof_settings(train, root / "out", steps=args.steps))
        timesteps = (50, 250)
        before = evaluate(config, models, build_weights(config, models), held_out, timesteps, device)
        began = time.perf_counter()
        result = run(config, models)
        seconds = time.perf_counter() - began
        after = evaluate(config, models, load_weights(result.weights_path), held_out, timesteps, device)
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'fp32'}): "
          f"{args.steps} steps in {seconds:.1f} s")  # fmt: skip
    print("held out before:", json.dumps(before["all"], indent=None))
    print("held out after: ", json.dumps(after["all"], indent=None))
    learned = all(
        m["prior_background"] > 0.9 and m["prior_subject"] < m["prior_background"] - 0.1
        for key, m in after.items()
        if key != "all"
    )
    print("routers learned the masks" if learned else "routers did NOT learn the masks")
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
