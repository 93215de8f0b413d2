"""Convert a pickled IP-Adapter (.bin) into the .safetensors file MoA loads, beside the original.

    python tools/convert_ipadapter.py models/ipadapter/ip-adapter_sd15_light_v11.bin

The pickle is read with torch.load(weights_only=True), which restores tensors and plain
containers only and refuses anything that would run code. The output has the flat keys every
safetensors IP-Adapter has: image_proj.* and ip_adapter.<n>.to_k_ip.weight / to_v_ip.weight.
Needs only torch and safetensors (run it with the Python that runs ComfyUI).
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

GROUPS = ("image_proj", "ip_adapter")


def flat_tensors(loaded: dict) -> dict[str, torch.Tensor]:
    """{"image_proj": {...}, "ip_adapter": {...}} (or already flat keys) -> flat `group.key` tensors."""
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a dict of tensors, found {type(loaded).__name__}")
    flat = {}
    for key, value in loaded.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update({f"{key}.{inner}": tensor for inner, tensor in value.items()})
        else:
            flat[key] = value
    if not any(k.startswith("ip_adapter.") for k in flat) or not any(k.startswith("image_proj.") for k in flat):
        raise ValueError("this file is not an IP-Adapter: it has no image_proj and ip_adapter weights")
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"non-tensor entries {bad[:3]}: not an IP-Adapter weights file")
    return {k: v.contiguous() for k, v in flat.items()}


def convert(source: Path, target: Path | None = None) -> Path:
    target = target or source.with_suffix(".safetensors")
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    save_file(flat_tensors(loaded), str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the .bin IP-Adapter file")
    parser.add_argument("--output", type=Path, help="where to write (default: beside it, .safetensors)")
    args = parser.parse_args(argv)
    try:
        target = convert(args.source, args.output)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"convert_ipadapter: {args.source}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
