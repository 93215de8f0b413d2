"""MoA against the base model in one process: sampling-step time, memory and output deviation.

Builds a full-size SD1.5 UNet in ComfyUI's classes (random weights) and MoA weights for it, then
times sampling through `comfy.sample.sample` (euler, CFG 7): each step is one model call on a batch
of 2, cond + uncond, exactly as ComfyUI's sampler batches them. The base model and every MoA mode
(through the pack's real patch, `apply_moa`) take turns in a rotating order over rounds; the table
gives medians and MoA/base ratios. Every MoA mode sees a subject region (a centred square covering
`--subject-area` of the image, `--background` elsewhere: 0 by default), which stands in for a trained
router localising a subject.
Also timed: loading the MoA weights file, and encoding a subject (ComfyUI's CLIP-vision ViT-L/14 on
one 224 px image, plus the fuser of every cross-attention layer).

    python benchmarks/bench_sampling.py                                   # the README table
    python benchmarks/bench_sampling.py --sizes 256 --rounds 1 --steps 1  # a smoke run

Modes are "+"-joined tokens: dense (every pixel), cond (uncond rows keep the prior),
sparse=T (threshold T), strength=S, r64 (rank-64 deltas), default (MoAOptions() as the node
runs it), host-kernel (the personal expert on ComfyUI's own attention kernel even where the
patch would pick fused SDPA); "base" is the model without MoA. IP-Adapter modes start with
"ipadapter" (bench_ipadapter.py: the expert with the attention router, +everywhere, +weight=W,
+reference for IP-Adapter's own cost); --modes ipadapter-set gives them all beside base.
"""

import argparse
import ctypes
import gc
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_setup  # from this script's folder

DEFAULT_MODES = (
    "base,dense,dense+strength=0.95,cond,sparse=0.01,sparse=0.05,sparse=0.2,cond+sparse=0.01,"
    "r64+sparse=0.01,sparse=0.01+host-kernel"
)
"""dense+strength=0.95 is there for its deviation: what one step of the strength slider changes."""
IPADAPTER_MODES = "base,ipadapter+reference,ipadapter,ipadapter+everywhere,ipadapter+weight=0"


@dataclass(frozen=True)
class Mode:
    name: str
    rank: int | None  # None: the base model; 0: full-rank deltas
    options: dict = field(default_factory=dict)  # MoAOptions fields
    host_kernel: bool = False  # the personal expert on the host's attention kernel
    ipadapter: frozenset = frozenset()  # an IP-Adapter mode's flags (bench_ipadapter.py); rank is then -1


def parse_mode(spec: str) -> Mode:
    """ "r64+cond+sparse=0.05" -> Mode(rank 64, personal_rows "cond", sparse_threshold 0.05)."""
    if spec == "base":
        return Mode(spec, None)
    if spec.startswith("ipadapter"):
        flags = frozenset(spec.split("+")[1:])
        return Mode(spec, -1, {"weight": float(next((f[7:] for f in flags if f.startswith("weight=")), 1.0))},
                    ipadapter=flags | {"ipadapter"})  # fmt: skip
    rank, options, host_kernel = 0, {"sparse_threshold": 0.0}, False
    for token in spec.split("+"):
        if token == "dense":
            options["sparse_threshold"] = 0.0
        elif token == "cond":
            options["personal_rows"] = "cond"
        elif token == "default":
            options.pop("sparse_threshold")
        elif token.startswith("sparse="):
            options["sparse_threshold"] = float(token.split("=", 1)[1])
        elif token.startswith("strength="):
            options["strength"] = float(token.split("=", 1)[1])
        elif token[:1] == "r" and token[1:].isdigit():
            rank = int(token[1:])
        elif token == "host-kernel":
            host_kernel = True
        else:
            known = "dense, cond, sparse=T, strength=S, rNN, default, host-kernel"
            raise SystemExit(f"--modes: unknown token {token!r} in {spec!r} ({known})")
    return Mode(spec, rank, options, host_kernel)


class PeakMemory:
    """Peak memory during a block: torch.cuda.max_memory_allocated on a GPU, else the process RSS
    sampled every 5 ms (after malloc_trim, so freed heap from earlier calls does not count)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak = cuda, 0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        if platform.system() == "Linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = 4096
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


@dataclass
class Result:
    times: list = field(default_factory=list)  # seconds per step, one per timed call
    peaks: list = field(default_factory=list)  # bytes
    paired: list = field(default_factory=list)  # time / the base call timed right beside it
    output: torch.Tensor | None = None  # the sampled latent of the untimed first call
    again: torch.Tensor | None = None  # dense modes: a second such call (the run-to-run floor)
    kept: float | None = None  # fraction of (row, pixel) queries the personal expert ran on
    maps_bytes: int = 0


def build_variants(base, modes: list[Mode], region, prompt, seed: int) -> dict:
    """Mode name -> (patched model, router record or None), sharing weights per rank."""
    from comfyui_moa.moa_core import RouterRecord
    from comfyui_moa.nodes.host import patch
    from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa

    weights, variants = {}, {}
    for mode in modes:
        if mode.rank is None:
            variants[mode.name] = (base, None)
            continue
        if mode.ipadapter:
            import bench_ipadapter

            variants[mode.name] = bench_ipadapter.variant(base, set(mode.ipadapter), mode.options["weight"])
            continue
        if mode.rank not in weights:
            weights[mode.rank] = bench_setup.weights_patcher(bench_setup.random_moa(base, mode.rank, seed))
        record = RouterRecord(weights[mode.rank].model.paths)  # MoA Apply records by default
        options = MoAOptions(**mode.options, region=region)
        materialising = patch._MATERIALISING
        if mode.host_kernel:
            patch._MATERIALISING = ()  # what apply_moa reads to pick fused SDPA
        try:
            variants[mode.name] = (apply_moa(base, weights[mode.rank], prompt, options, record), record)
        finally:
            patch._MATERIALISING = materialising
    return variants


def query_counter(base):
    """Forward hooks counting the rows x pixels every attention's to_out sees: the first call of a
    layer is the prior's, any later one the personal expert's (whose q/k/v may be one matmul with
    a merged weight, while its output projection always runs). Returns (counts, remove)."""
    from comfyui_moa.nodes.host.unet_layers import attention_modules

    counts = {}

    def hook(module, args, output):
        counts.setdefault(id(module), []).append(args[0].shape[0] * args[0].shape[1])

    modules = attention_modules(base.model.diffusion_model).values()
    handles = [m.to_out.register_forward_hook(hook) for m in modules]
    return counts, lambda: [h.remove() for h in handles]


def kept_fraction(counts: dict) -> float:
    prior = sum(calls[0] for calls in counts.values())
    return sum(sum(calls[1:]) for calls in counts.values()) / prior


def sample_once(model, size: int, steps: int, seed: int, conds) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, 7.0, "euler", "normal", *conds, latent, seed=seed, disable_pbar=True
    )


def run_size(base, variants: dict, size: int, args, conds, dense: set[str]) -> dict[str, Result]:
    """Warm-up call per variant (its output, kept fraction and maps), then timed rounds. In each
    round every MoA mode is timed next to a base call (which goes first alternates), so a machine
    whose speed drifts over minutes (a shared VM: +-15 % here) still gives a fair paired ratio."""
    cuda = torch.cuda.is_available()
    results = {name: Result() for name in variants}
    for name, (model, record) in variants.items():
        counts, remove = query_counter(base)
        try:
            results[name].output = sample_once(model, size, 1, args.seed, conds).float()
        finally:
            remove()
        if name in dense:
            results[name].again = sample_once(model, size, 1, args.seed, conds).float()
        if record is not None:
            # IP-Adapter experts multiply by to_out's matrix without calling it: no count to read
            results[name].kept = None if name.startswith("ipadapter") else kept_fraction(counts)
            maps = [record.get(step, layer) for step in record.steps() for layer in record.layers()]
            results[name].maps_bytes = sum(m.numel() * m.element_size() for m in maps if m is not None)

    def timed(name: str) -> float:
        with PeakMemory(cuda) as peak:
            start = time.perf_counter()
            sample_once(variants[name][0], size, args.steps, args.seed, conds)
            if cuda:
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.steps
        results[name].times.append(elapsed)
        results[name].peaks.append(peak.peak)
        return elapsed

    base_name = next((name for name, (model, record) in variants.items() if model is base), None)
    names = [name for name in variants if name != base_name]
    start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for i, name in enumerate(order if r % 2 == 0 else order[::-1]):
            if base_name is None:
                timed(name)
            elif (r + i) % 2:
                results[name].paired.append(timed(name) / timed(base_name))
            else:
                base_time = timed(base_name)
                results[name].paired.append(timed(name) / base_time)
        elapsed = time.perf_counter() - start
        print(f"  {size} px round {r + 1}/{args.rounds} done ({elapsed:.0f} s)", file=sys.stderr, flush=True)
    return results


def is_dense(mode: Mode) -> bool:
    return mode.rank is not None and mode.options == {"sparse_threshold": 0.0} and not mode.host_kernel


def deviation(results: dict[str, Result], modes: dict[str, "Mode"], name: str) -> float | None:
    """max |mode - dense| / max |dense - base| of the sampled latents (dense: the same rank's; for
    dense itself, its second run: the floor that nondeterministic kernels set)."""
    mode = modes[name]
    dense = next((m for m in modes.values() if m.rank == mode.rank and is_dense(m)), None)
    base = next((m for m in modes.values() if m.rank is None), None)
    if mode.rank is None or dense is None or base is None:
        return None
    reference = results[dense.name].output
    effect = (reference - results[base.name].output).abs().max()
    output = results[name].again if name == dense.name else results[name].output
    return float((output - reference).abs().max() / effect)


def load_time(weights, repeats: int = 3) -> tuple[float, int]:
    """(median seconds of moa_core.load_weights as MoA Loader calls it, file bytes)."""
    import tempfile

    import comfy.model_management as mm

    from comfyui_moa.moa_core import load_weights, save_weights

    with tempfile.TemporaryDirectory(prefix="moa-bench-") as tmp:
        path = Path(tmp) / "moa_sd15.safetensors"
        save_weights(weights, path)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            load_weights(path, dtype=mm.unet_dtype())
            times.append(time.perf_counter() - start)
        return statistics.median(times), path.stat().st_size


def encode_time(weights, context: torch.Tensor, tiny: bool, repeats: int = 3) -> tuple[float, float]:
    """(CLIP-vision encode of one 224 px image, the fuser for every cross-attention layer as one
    model call runs it, for one subject word of `context` [1, 77, 768]), median seconds each."""
    from comfyui_moa.moa_core import PersonalPrompt, fuse_subjects, subject_tokens

    vision = bench_setup.clip_vision(tiny)
    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(5))
    timestep = torch.tensor([500.0])
    encode, fuse = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        embeds = vision.encode_image(image).image_embeds.float().cpu()
        middle = time.perf_counter()
        prompt = PersonalPrompt.single(context.shape[1], [bench_setup.SUBJECT_TOKEN], [0], embeds)
        tokens = subject_tokens(prompt, [0], context.shape[1], timestep, context.device)
        with torch.no_grad():
            fuse_subjects(context, tokens, weights.fuser)
        if i:  # the first call loads the model
            encode.append(middle - start)
            fuse.append(time.perf_counter() - middle)
    return statistics.median(encode), statistics.median(fuse)


def profile(model, size: int, args, conds, rows: int) -> str:
    """torch.profiler's table of one sampling step, ops by their own time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        sample_once(model, size, 1, args.seed, conds)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def machine() -> str:
    import comfy.ldm.modules.attention as host_attention

    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} (fp16 UNet)"
    else:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        where = f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads (fp32 UNet)"
    backend = host_attention.optimized_attention.__name__
    return f"{where}, torch {torch.__version__}, attention `{backend}`"


def is_default(mode: Mode) -> bool:
    from comfyui_moa.nodes.host.patch import MoAOptions

    if mode.rank != 0 or mode.host_kernel:
        return False
    options, default = MoAOptions(**mode.options), MoAOptions()
    fields = ("personal_rows", "sparse_threshold", "strength", "router_mode")
    return all(getattr(options, f) == getattr(default, f) for f in fields)


def table(size: int, modes: dict[str, Mode], results: dict[str, Result]) -> list[str]:
    base = next((results[m.name] for m in modes.values() if m.rank is None), None)
    lines = []
    for name, mode in modes.items():
        res = results[name]
        median = statistics.median(res.times) if res.times else float("nan")
        if base is None or not res.times:
            ratio = paired = fastest = "-"
        else:
            ratio = f"{median / statistics.median(base.times):.3f}"
            paired = f"{statistics.median(res.paired):.3f}" if res.paired else "1.000"
            fastest = f"{min(res.times) / min(base.times):.3f}"
        dev = deviation(results, modes, name)
        peak = statistics.median(res.peaks) / 2**30 if res.peaks else float("nan")
        extra = "-" if base is None or not res.peaks else f"{peak - statistics.median(base.peaks) / 2**30:+.2f}"
        label = f"{name} (default)" if is_default(mode) else name
        kept = "-" if res.kept is None else f"{100 * res.kept:.1f} %"
        lines.append(
            f"| {size} | {label} | {median:.3f} | {ratio} | {paired} | {fastest} | {kept} | "
            f"{'-' if dev is None else f'{dev:.4f}'} | {peak:.2f} | {extra} |"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each mode and a base call per round)")
    parser.add_argument("--steps", type=int, default=1, help="sampling steps per timed call")
    parser.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated; see the module docstring")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--attention", default="default", choices=["default", "pytorch", "sub_quad", "split"])
    parser.add_argument("--subject-area", type=float, default=0.25, help="region: centred square of this area")
    parser.add_argument(
        "--background", type=float, default=0.0,
        help="region off the subject: 0 (the default) leaves it to the prior; e.g. 0.05 stands in for a router "
        "that gives the background up to 5 %% instead of nothing",
    )  # fmt: skip
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl", "tiny"], help="tiny: check the script")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per mode")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def header(args, params: float) -> list[str]:
    return [
        "### MoA sampling benchmark",
        "",
        f"- {machine()}",
        f"- {'SDXL' if args.model == 'sdxl' else 'SD1.5'}-architecture UNet ({params:.1f} M parameters, random "
        f"weights); one step = one model call on "
        f"cond + uncond (batch 2) via `comfy.sample.sample` (euler, CFG 7); {args.steps} step(s) per call, "
        f"{args.rounds} round(s), modes in rotating order, each timed next to a base call; subject region: "
        f"centred square over {100 * args.subject_area:.0f} % of the image"
        + (f", {args.background:g} elsewhere" if args.background else ""),
        "- MoA/base: ratio of the medians; paired: median over rounds of (mode / the base call beside it); "
        "fastest: ratio of the fastest calls (interference from other work only ever adds time, so the fastest "
        "call is the least disturbed); kept: share of (row, pixel) queries the personal expert ran on; dev: "
        "max |latent - dense| / max |dense - base| after one step (on the dense row: a second dense run, the "
        "run-to-run floor)",
        "",
        "| px | mode | s/step | MoA/base | paired | fastest | kept | dev vs dense | peak GiB | Δ peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def footer(full, maps: dict[int, int], context: torch.Tensor, tiny: bool) -> list[str]:
    """Weights size and load time, recorded maps, subject encode time."""
    seconds, size_bytes = load_time(full)
    count = sum(p.numel() for p in full.parameters()) / 1e6
    encode, fuse = encode_time(full, context, tiny)
    vit = "2-layer test ViT" if tiny else "ViT-L/14"
    return [
        f"- MoA weights (full-rank deltas): {count:.1f} M parameters, {size_bytes / 2**20:.0f} MiB file; "
        f"`moa_core.load_weights`: {seconds:.3f} s (median of 3)",
        "- router maps recorded per run: " + ", ".join(f"{s} px {b / 2**10:.0f} KiB" for s, b in maps.items()),
        f"- subject encode: CLIP vision {vit}, one 224 px image: {encode:.3f} s; fuser for all "
        f"{len(full.config.cross_layers)} cross-attention layers (one call per step): {1e3 * fuse:.1f} ms",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_setup.use_host(args.attention)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = IPADAPTER_MODES if args.modes == "ipadapter-set" else args.modes
    modes = {spec: parse_mode(spec) for spec in specs.split(",")}
    tiny = args.model == "tiny"
    unet = bench_setup.UNETS[args.model]
    base = bench_setup.build_unet(unet)
    positive, negative, prompt = bench_setup.conditioning(context_dim=unet["context_dim"])
    conds = (positive, negative)
    variants = build_variants(
        base,
        list(modes.values()),
        bench_setup.centred_square(args.subject_area, outside=args.background),
        prompt,
        args.seed,
    )
    # printed as it is measured: a run cut short by a time limit still leaves its finished sizes
    emit(header(args, sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e6))
    profiles, maps = [], {}
    for size in args.sizes:
        results = run_size(base, variants, size, args, conds, {n for n, m in modes.items() if is_dense(m)})
        emit(table(size, modes, results))
        if any(m.ipadapter for m in modes.values()):
            import bench_ipadapter

            emit(bench_ipadapter.ratios(size, list(modes), results))
        maps[size] = max((r.maps_bytes for r in results.values()), default=0)
        if args.profile:
            for name, (model, _) in variants.items():
                text = profile(model, size, args, conds, args.profile_rows)
                profiles.append(f"#### {name}, {size} px\n```\n{text}\n```")
    variants.clear()  # their weights go before the footer's set is built (SDXL's are 4 GB each)
    gc.collect()
    full = bench_setup.random_moa(base, 0, args.seed)
    emit(["", *footer(full, maps, positive[0][0], tiny), *profiles])
    return 0


def emit(lines: list[str]) -> None:
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
