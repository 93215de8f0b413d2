"""`python -m moa_world <command>` from the repository root.

- `build [--seed 0]`: the trained world of a prior seed (prior ~35 min, then the subject encoder)
  and the judges, each built only when absent from ~/.cache/comfyui-moa/world/; prints the folders.
- `prior [--seed 0] [--steps N] [--out DIR] [--progress FILE]`: train a prior only (DIR default:
  its cache folder).
- `encoder DIR [--seed 0]`: train the subject encoder of the world in DIR (rewrites DIR).
- `judges`: train (when absent) and report the judges on real images.
- `quality [--world DIR] [--count 64]`: the judges on the prior's samples against real scenes of the
  same prompts (background, subject words, object classes).
- `ship [--source DIR]`: write the fp16 copy of the seed-0 world (or DIR) to moa_world/assets/prior.
- `folder ROOT [--count 2000] [--seed 1]`: generic scenes in moa_train's folder layout.
- `evaluate ...`, `demo-weights ...`, `photo-swap ...`: the evaluation, the demo's MoA weights and the
  real-photo swap's figures (evaluate.py, demo.py, photo_swap.py).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import moa_pack

HANDED_OVER = {
    "evaluate": "moa_world.evaluate",
    "demo-weights": "moa_world.demo",
    "photo-swap": "moa_world.photo_swap",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moa_world", description="The small world of ComfyUI-MoA.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="the trained world and the judges, built when absent")
    build.add_argument("--seed", type=int, default=0, help="the prior's seed")
    build.add_argument("--progress", type=Path, default=None, help="write the prior's progress bar here")
    prior = commands.add_parser("prior", help="train the world's prior only")
    prior.add_argument("--seed", type=int, default=0)
    prior.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    prior.add_argument("--out", type=Path, default=None, help="default: the cache folder")
    prior.add_argument("--progress", type=Path, default=None, help="write the progress bar here")
    encoder = commands.add_parser("encoder", help="train the subject encoder of a world folder")
    encoder.add_argument("folder", type=Path)
    encoder.add_argument("--seed", type=int, default=0)
    encoder.add_argument("--steps", type=int, default=None)
    commands.add_parser("judges", help="train (when absent) and report the judges")
    quality = commands.add_parser("quality", help="the judges on the prior's samples against real scenes")
    quality.add_argument("--world", type=Path, default=None, help="default: the seed-0 world (built when absent)")
    quality.add_argument("--count", type=int, default=64, help="prompts, one sample each")
    ship = commands.add_parser("ship", help="write the fp16 world into moa_world/assets/prior")
    ship.add_argument("--source", type=Path, default=None, help="default: the seed-0 world (built when absent)")
    folder = commands.add_parser("folder", help="write generic scenes in moa_train's folder layout")
    folder.add_argument("root", type=Path)
    folder.add_argument("--count", type=int, default=2000)
    folder.add_argument("--seed", type=int, default=1)
    folder.add_argument("--two-subjects", type=float, default=0.3, help="share of two-subject scenes")
    for name in HANDED_OVER:
        commands.add_parser(name, help=f"see {HANDED_OVER[name]}", add_help=False)
    return parser


def _use_host() -> None:
    moa_pack.use_host(cpu=True)
    import comfy.cli_args

    # torch's fused attention: about 3x faster here than ComfyUI's CPU default (sub-quadratic)
    comfy.cli_args.args.use_pytorch_cross_attention = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] in HANDED_OVER:
        _use_host()
        return moa_pack.module(HANDED_OVER[argv[0]]).main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "folder":
        keys = moa_pack.module("moa_world.scenes").write_folder(args.root, args.count, args.seed, args.two_subjects)
        print(f"wrote {len(keys)} scenes to {args.root}")
        return 0
    _use_host()
    build = moa_pack.module("moa_world.build")
    train = moa_pack.module("moa_world.train")
    if args.command == "prior":
        recipe = train.PriorRecipe(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        out = args.out or train.cached_folder(recipe)
        facts = train.train_prior(out, recipe, args.progress)
        print(
            f"wrote the prior to {out} ({recipe.steps} steps, {facts['seconds']:.0f} s, loss {facts['final_loss']:.4f})"
        )
    elif args.command == "encoder":
        facts = build.train_encoder_into(args.folder, args.seed, args.steps)
        print(json.dumps(facts["encoder_report"], indent=1))
    elif args.command == "judges":
        folder = build.judges_folder()
        print(folder)
        print(json.dumps(json.loads((folder / "judges.json").read_text())["report"], indent=1))
    elif args.command == "quality":
        world = moa_pack.module("moa_world.models").load_world(args.world or build.world_folder(0))
        judges = moa_pack.module("moa_world.judges").Judges.load(build.judges_folder())
        report, _ = moa_pack.module("moa_world.quality").prior_quality(world, judges, args.count)
        print(json.dumps(report, indent=1))
    elif args.command == "build":
        print(f"world: {build.world_folder(args.seed, progress_file=args.progress)}")
        print(f"judges: {build.judges_folder()}")
    elif args.command == "ship":
        print(f"wrote {build.ship(args.source or build.world_folder(0))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
