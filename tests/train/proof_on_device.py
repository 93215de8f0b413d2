"""The trainer's proof run (tests/train's, 120 steps on synthetic subjects) on whatever device is
there: a GPU trains in bf16 autocast, which the CPU tests cannot check. Prints the held-out metrics
before and after and exits 1 unless the routers learn the masks as the CPU test requires.

    python tests/train/proof_on_device.py [--steps 120]
"""

import argparse
import json
import sys
import tempfile
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

    from moa_testing.synthetic import write_dataset
    from moa_testing.training import mask_learning_failures, proof_models, proof_run, proof_settings
    from moa_train.config import TrainConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="moa-proof-") as tmp:
        root = Path(tmp)
        train, held_out = write_dataset(root / "train", 48, seed=0), write_dataset(root / "held_out", 8, seed=1)
        (root / "models").mkdir()
        models = proof_models(root / "models")
        config = TrainConfig.from_dict(proof_settings(train, root / "out", steps=args.steps))
        before, _, seconds, after = proof_run(config, models, held_out, device)
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'fp32'}): "
          f"{args.steps} steps in {seconds:.1f} s")  # fmt: skip
    print("held out before:", json.dumps(before["all"]))
    print("held out after: ", json.dumps(after["all"]))
    failures = mask_learning_failures(after)
    print("routers learned the masks" if not failures else "routers did NOT learn the masks:", *failures, sep="\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
