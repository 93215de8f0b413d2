"""Our IP-Adapter expert against ComfyUI_IPAdapter_plus on the same generated file and CLIP outputs.

    python benchmarks/compare_ipadapter_plus.py --ipadapter-plus /path/to/custom_nodes/ComfyUI_IPAdapter_plus

Builds a full-size SD1.5 UNet (random weights), an IP-Adapter file's state dict with the published
key names (moa_testing.ipadapter_files, image keys scaled up so the adapter visibly acts), and runs 2
euler steps at 64 px, CFG 7, weight 0.8: IPAdapter_plus's `ipadapter_execute` (given the CLIP outputs
as pos_embed/neg_embed) against MoA IP-Adapter Apply's patch with the router forced to the expert
everywhere; once with every layer, once with the middle block's layer at 0. Nothing of
IPAdapter_plus is copied: it is imported from the folder given.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import bench_setup  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipadapter-plus", type=Path, required=True, help="a ComfyUI_IPAdapter_plus checkout")
    parser.add_argument("--kind", default="plus", choices=["sd15", "plus", "full-face"])
    args = parser.parse_args(argv)
    bench_setup.use_host("default")
    import comfy.sample

    from comfyui_moa.moa_core.attention_router import AttentionRouterConfig
    from comfyui_moa.moa_core.ipadapter import build_ipadapter
    from comfyui_moa.nodes.host.ipadapter import build_runtime, check_adapter_fits
    from comfyui_moa.nodes.host.ipadapter_patch import apply_ipadapter
    from moa_testing.ipadapter_files import sd15_state_dict

    sys.path.insert(0, str(args.ipadapter_plus.resolve().parent))
    plus = __import__(f"{args.ipadapter_plus.resolve().name}.IPAdapterPlus", fromlist=["ipadapter_execute"])

    base = bench_setup.build_unet(bench_setup.SD15_UNET)
    flat = {k: v * (10.0 if "_ip." in k else 1.0) for k, v in sd15_state_dict(args.kind, seed=1).items()}
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        nested[group][rest] = value
    generator = torch.Generator().manual_seed(2)
    if args.kind == "sd15":
        pos, neg = torch.randn(1, 1024, generator=generator), torch.zeros(1, 1024)
    else:
        pos, neg = torch.randn(1, 257, 1280, generator=generator), torch.randn(1, 257, 1280, generator=generator)
    theirs, _ = plus.ipadapter_execute(base.clone(), nested, None, pos_embed=pos, neg_embed=neg, weight=0.8)
    adapter = build_ipadapter(flat, "compare")
    paths = check_adapter_fits(base, adapter.spec, "compare")
    options = {
        "weight": 0.8, "weight_type": "linear", "start_percent": 0.0, "end_percent": 1.0,
        "router_mode": "personal everywhere", "router": AttentionRouterConfig(), "sparse_threshold": 0.0,
        "input_name": "compare",
    }  # fmt: skip
    positive, negative, _ = bench_setup.conditioning()

    def run(model) -> torch.Tensor:
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 42)
        conds = (positive, negative)
        return comfy.sample.sample(model, noise, 2, 7.0, "euler", "normal", *conds, latent, seed=42, disable_pbar=True)

    reference, plain = run(theirs), run(base)
    for without_middle in (False, True):
        runtime = build_runtime(base, bench_setup.weights_patcher(adapter), pos, neg, [(5,)], 77, options, paths, None)
        if without_middle:
            middle = ("middle", 0, 0)
            runtime.layers[middle] = dataclasses.replace(runtime.layers[middle], weight=0.0)
        ours = run(apply_ipadapter(base, runtime, "compare"))
        print(
            f"{args.kind}, middle layer {'off' if without_middle else 'on'}: max |ours - IPAdapter_plus| = "
            f"{(ours - reference).abs().max():.3g} (IPAdapter_plus vs base: {(reference - plain).abs().max():.3g}, "
            f"latent up to {reference.abs().max():.3g})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
