"""python -m moa_runner [WORKFLOW.json]: run a UI-format workflow headless and save its images.

Without a workflow it runs the pack's basic example, example_workflows/moa_one_subject.json.
`--demo` needs no model files: it runs the small world shipped in the repository (its prior, MoA
weights trained on it and photos of two subjects it never saw) and writes prior-vs-MoA grids.
"""

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import moa_pack  # noqa: E402

DEFAULT_WORKFLOW = ROOT / "example_workflows" / "moa_one_subject.json"
DEMO_WORKFLOW = ROOT / "moa_world" / "workflows" / "moa_world_demo.json"
DEMO_PHOTOS = ROOT / "moa_world" / "assets" / "subjects"
DEMO_FILES = (ROOT / "moa_world" / "assets" / "prior" / "world.json", ROOT / "moa_world" / "assets" / "moa")


def demo_ready() -> bool:
    return DEMO_FILES[0].is_file() and any(DEMO_FILES[1].glob("*.safetensors"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moa_runner", description=__doc__.split("\n")[0])
    p.add_argument("workflow", nargs="?", type=Path, help="UI-format workflow JSON (default: the basic example)")
    p.add_argument("--demo", action="store_true", help="run the small world shipped in the repo: no model files")
    p.add_argument("--server", help="URL of a running ComfyUI (default: start one from the ComfyUI found)")
    p.add_argument("--port", type=int, default=0, help="port for a started server (default: a free one)")
    p.add_argument("--out", type=Path, default=Path("moa_outputs"), help="folder for the output images")
    p.add_argument("--image", action="append", default=[], metavar="NAME=PATH", help="upload PATH as input NAME")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input")
    p.add_argument("--comfyui-arg", action="append", default=[], help="extra argument for a started main.py")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.demo and not demo_ready():
        print(
            "the small world's files are missing from moa_world/assets; `python -m moa_world build`, `... ship` "
            "and `... demo-weights` rewrite them (docs/small-world.md)",
            file=sys.stderr,
        )
        return 1
    if args.demo:
        args.workflow = args.workflow or DEMO_WORKFLOW
        args.image += [f"{photo.name}={photo}" for photo in sorted(DEMO_PHOTOS.glob("*.png"))]
    args.workflow = args.workflow or DEFAULT_WORKFLOW
    moa_pack.load()
    server_mod = moa_pack.module("moa_runner.server")
    run = moa_pack.module("moa_runner.run")
    workflow_mod = moa_pack.module("moa_runner.workflow")
    try:
        workflow = json.loads(args.workflow.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read the workflow {args.workflow}: {e}", file=sys.stderr)
        return 2
    try:
        if args.server:
            server = server_mod.ComfyServer.connect(args.server.rstrip("/"))
        else:
            comfyui = moa_pack.find_host()
            if comfyui is None:
                print("no ComfyUI found: set COMFYUI_PATH, or pass --server URL", file=sys.stderr)
                return 2
            extra = list(args.comfyui_arg)
            if "--cpu" not in extra and not _has_gpu():
                extra.append("--cpu")
            print(f"starting ComfyUI from {comfyui} ...", file=sys.stderr)
            server = server_mod.ComfyServer.start(comfyui, moa_pack.ROOT, args.port or free_port(), extra)
        with server:
            server.check_pack()
            return _run(server, workflow, args, run, workflow_mod)
    except (server_mod.ServerError, run.RunError, workflow_mod.WorkflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(server, workflow, args, run, workflow_mod) -> int:
    prompt = workflow_mod.ui_to_api(workflow, server.object_info())
    run.apply_overrides(prompt, args.set)
    for item in args.image:
        name, _, path = item.partition("=")
        asyncio.run(run.upload_image(server.url, name, Path(path)))
    missing = run.missing_files(prompt, server.object_info())  # after uploads: they add to LoadImage's choices
    if missing:
        print("missing files; put them here and run again:\n  " + "\n  ".join(missing), file=sys.stderr)
        if not args.demo and demo_ready():
            print(
                "no model files yet? `python -m moa_runner --demo` runs the small world shipped in the repo",
                file=sys.stderr,
            )
        return 1
    result = asyncio.run(run.run_prompt(server.url, prompt, args.out, args.timeout))
    print(f"done in {result.seconds:.1f} s; {len(result.images)} images in {args.out}/")
    for image in result.images:
        print(f"  {image}")
    if args.demo:
        grid = run.stack_rows(result.images, args.out / "prior_vs_moa.png")
        print(f"prior (top), MoA (middle) and MoA's router masks (bottom) at the same seeds: {grid}")
    return 0


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
