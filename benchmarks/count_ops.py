"""Operations MoA dispatches per model call, against the base model, in one process.

On a GPU at SD1.5 sizes the step time follows the number of operations Python launches, not their
maths (docs/benchmark-gpu.md), so this count is the GPU speed figure that needs no GPU: every aten
operation dispatched inside the model call (`BaseModel.apply_model`: the UNet's forward and every
wrapper around it, where MoA plans the call), for one model call on cond + uncond (batch 2) of
`comfy.sample.sample` (euler, CFG 7), through the pack's real patch: the second call of a two-step
run (the first builds what a run builds once; "first call" is how many more it dispatches). The
count is deterministic.

Both code paths of the patch are counted on any machine: "gpu" (what `apply_moa` picks on a GPU:
projections merged once per sampling run, moa_core.merged; the threshold applied in place) and "cpu"
(host weights read per call, sparse pixels gathered); `nodes/host/patch.py::_compute_bound` chooses.

    python benchmarks/count_ops.py                      # the README table (full SD1.5 UNet, 256 px)
    python benchmarks/count_ops.py --subject-area 0.25  # with bench_sampling.py's subject region
    python benchmarks/count_ops.py --model sdxl         # the full SDXL UNet (140 MoA layers)
    python benchmarks/count_ops.py --model tiny         # checks the script in seconds

Modes as in bench_sampling.py ("base", "dense", "default", "cond", "sparse=T", ...).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sampling  # from this script's folder
import bench_setup

MODES = "base,dense,default"
PATHS = ("gpu", "cpu")


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name (aten.mm, aten.view, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_model_calls(model, size: int, seed: int, conds, steps: int = 2) -> list[Counter]:
    """`steps` sampling steps of `model`; the operations of each model call (`apply_model`)."""
    calls: list[Counter] = []
    base_model = model.model
    apply_model = base_model.apply_model

    def counted(*args, **kwargs):
        with OpCounter() as counter:
            output = apply_model(*args, **kwargs)
        calls.append(counter.counts)
        return output

    base_model.apply_model = counted
    try:
        bench_sampling.sample_once(model, size, steps, seed, conds)
    finally:
        del base_model.apply_model
    return calls


def variants_on_path(base, modes: list, region, prompt, seed: int, path: str) -> dict:
    """bench_sampling's variants with the patch's code path forced to `path`."""
    from comfyui_moa.nodes.host import patch

    chosen = patch._compute_bound
    patch._compute_bound = lambda device: path == "cpu"
    try:
        return bench_sampling.build_variants(base, modes, region, prompt, seed)
    finally:
        patch._compute_bound = chosen


def extra_kinds(counts: Counter, base: Counter, top: int) -> str:
    """The `top` operation kinds MoA adds most of, as 'view +810, t +324'."""
    extra = Counter({name: counts[name] - base[name] for name in counts if counts[name] > base[name]})
    return ", ".join(f"{name} +{n}" for name, n in extra.most_common(top)) or "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=MODES, help="comma-separated, as bench_sampling.py's")
    parser.add_argument("--paths", default=",".join(PATHS), help="the patch's code paths to count: gpu, cpu")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (counts barely depend on it)")
    parser.add_argument(
        "--subject-area", type=float, default=1.0,
        help="a region: centred square of this area (1: none, as MoA Apply runs without one; a region adds one "
        "multiply per layer)",
    )  # fmt: skip
    parser.add_argument("--model", default="sd15", choices=list(bench_setup.UNETS))
    parser.add_argument(
        "--attention", default="pytorch", choices=["default", "pytorch", "sub_quad", "split"],
        help="the host's attention kernel: pytorch (fused SDPA) is what ComfyUI runs on NVIDIA GPUs",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=6, help="extra operation kinds listed per mode")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_setup.use_host(args.attention)
    modes = [bench_sampling.parse_mode(spec) for spec in args.modes.split(",")]
    paths = args.paths.split(",")
    if unknown := [p for p in paths if p not in PATHS]:
        raise SystemExit(f"--paths: unknown path {unknown[0]!r} (gpu, cpu)")
    config = bench_setup.UNETS[args.model]
    base = bench_setup.build_unet(config)
    positive, negative, prompt = bench_setup.conditioning(context_dim=config["context_dim"])
    region = bench_setup.centred_square(args.subject_area)
    print("### Operations per model call (cond + uncond, batch 2)\n")
    area = "no subject region" if region is None else f"subject region {100 * args.subject_area:.0f} % of the image"
    print(f"- {bench_sampling.machine()}; {args.model} UNet, {args.size} px, {area}; "
          "every aten operation of the model call (apply_model)\n")  # fmt: skip
    print("| path | mode | operations | MoA/base | largest extra kinds | first call |")
    print("|---|---|---|---|---|---|")
    base_counts = None
    for path in paths:
        variants = variants_on_path(base, modes, region, prompt, args.seed, path)
        for mode in modes:
            if mode.rank is None and base_counts is not None:
                continue  # the base model has one path
            model = variants[mode.name][0]
            calls = count_model_calls(model, args.size, args.seed, (positive, negative))
            if len(calls) != 2:
                raise SystemExit(f"expected one model call per step, counted {len(calls)} in two steps")
            counts = calls[1]
            first, total = sum(calls[0].values()), sum(counts.values())
            if mode.rank is None:
                base_counts = counts
                print(f"| - | base | {total} | 1.00 | - | - |", flush=True)
                continue
            ratio = "-" if base_counts is None else f"{total / sum(base_counts.values()):.2f}"
            kinds = "-" if base_counts is None else extra_kinds(counts, base_counts, args.top)
            default = bench_sampling.is_default(mode) and mode.name != "default"
            label = f"{mode.name} (default)" if default else mode.name
            print(f"| {path} | {label} | {total} | {ratio} | {kinds} | {first - total:+d} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
