"""`python -m moa_world <command>` from the repository root.

- `prior [--seed 0] [--steps 2000] [--out DIR] [--progress FILE]`: train the prior into DIR
  (default: its cache folder ~/.cache/comfyui-moa/world/<key>, printed).
- `folder ROOT [--count 2000] [--seed 1]`: generic scenes in moa_train's folder layout.
"""

import argparse
import logging
import sys
from pathlib import Path

import moa_pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moa_world", description="The small world of ComfyUI-MoA.")
    commands = parser.add_subparsers(dest="command", required=True)
    prior = commands.add_parser("prior", help="train the world's prior (about 30 min on 2 cores)")
    prior.add_argument("--seed", type=int, default=0)
    prior.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    prior.add_argument("--out", type=Path, default=None, help="default: the cache folder")
    prior.add_argument("--progress", type=Path, default=None, help="write the progress bar here")
    folder = commands.add_parser("folder", help="write generic scenes in moa_train's folder layout")
    folder.add_argument("root", type=Path)
    folder.add_argument("--count", type=int, default=2000)
    folder.add_argument("--seed", type=int, default=1)
    folder.add_argument("--two-subjects", type=float, default=0.3, help="share of two-subject scenes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "folder":
        scenes = moa_pack.module("moa_world.scenes")
        keys = scenes.write_folder(args.root, args.count, args.seed, args.two_subjects)
        print(f"wrote {len(keys)} scenes to {args.root}")
        return 0
    moa_pack.use_host(cpu=True)
    import comfy.cli_args

    # torch's fused attention: several times faster than ComfyUI's CPU default (sub-quadratic) here
    comfy.cli_args.args.use_pytorch_cross_attention = True
    train = moa_pack.module("moa_world.train")
    if args.command == "prior":
        recipe = train.PriorRecipe(seed=args.seed)
        if args.steps is not None:
            recipe = train.PriorRecipe(seed=args.seed, steps=args.steps)
        out = args.out or train.cached_folder(recipe)
        facts = train.train_prior(out, recipe, args.progress)
        print(
            f"wrote the world to {out} ({facts['steps'] if 'steps' in facts else recipe.steps} steps, "
            f"{facts['seconds']:.0f} s, loss {facts['final_loss']:.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
