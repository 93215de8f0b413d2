"""Checkpoints for exact resume, and the proof that frozen weights stayed frozen.

A checkpoint is one safetensors file (no pickle): the trainable tensors, the optimizer's state
tensors and the RNG states, with JSON metadata for the step, the skip count, the optimizer's
parameter groups and the training settings it was written with. The data position needs no
saving: the samples of step s follow from (seed, s) alone (samples.py).
"""

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from comfyui_moa.moa_core.errors import ConfigError

FORMAT = "comfyui-moa-train-state"
FIELDS = ("step", "loss", "masked_diffusion", "router", "router_subject", "object", "prior_background",
          "prior_subject", "grad_norm", "skipped")  # fmt: skip
VERSION = 1


@dataclass(frozen=True)
class Resumed:
    step: int
    skipped: int


def checkpoint_path(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step_{step:08d}.safetensors"


def save_checkpoint(path: Path, step: int, skipped: int, model: nn.Module, optimizer, settings: dict) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoints intact)."""
    tensors = {f"model.{name}": p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "step": str(step),
        "skipped": str(skipped),
        "param_groups": json.dumps(state["param_groups"]),
        "settings": json.dumps(settings, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def find_checkpoint(output: Path, resume: str) -> Path:
    """The file `[run] resume` names: "latest" in <output>/checkpoints, or a path. Never a silent
    fresh start: a missing checkpoint is an error."""
    if resume == "latest":
        found = sorted((output / "checkpoints").glob("step_*.safetensors"))
        if not found:
            raise ConfigError(f'[run] resume = "latest": no checkpoint in {output / "checkpoints"}; '
                              'remove resume to start a new run')  # fmt: skip
        return found[-1]
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"[run] resume: {path} is no checkpoint file")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer, settings: dict) -> Resumed:
    """Restore `model`'s trainable tensors, the optimizer and the RNG states from `path`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"[run] resume: {path.name} is not a readable checkpoint ({e})") from None
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"[run] resume: {path.name} is not an MoA trainer checkpoint")
    saved, current = _flat(json.loads(metadata["settings"])), _flat(json.loads(json.dumps(settings)))
    changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if changed:
        raise ConfigError(
            f"[run] resume: {path.name} was trained with other settings ({', '.join(changed)} differ); "
            "resume with the settings it was written with, or start a new run in another output folder"
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
    state: dict = {"state": {}, "param_groups": json.loads(metadata["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return Resumed(int(metadata["step"]), int(metadata["skipped"]))


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: names the settings that differ."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prune_checkpoints(output: Path, keep: int) -> None:
    if keep:
        for old in sorted((output / "checkpoints").glob("step_*.safetensors"))[:-keep]:
            old.unlink()


def frozen_digests(modules: dict[str, nn.Module], trainable: set[int]) -> dict[str, str]:
    """A hash of every parameter and buffer of `modules` except the `trainable` ones (by id): taken
    before and after training, equal digests prove the frozen model was not touched."""
    digests = {}
    for prefix, module in modules.items():
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if id(tensor) in trainable:
                continue
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)
            digests[f"{prefix}.{name}"] = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
    return digests


def check_frozen(before: dict[str, str], after: dict[str, str]) -> None:
    changed = sorted(name for name in before if before[name] != after.get(name))
    if changed or set(after) != set(before):
        # an internal invariant, not bad input: the trainer itself must never touch these
        raise RuntimeError(f"frozen weights changed during training: {', '.join(changed[:5]) or 'the set of tensors'}")


class CsvLog:
    """log.csv, one row per step; on resume the rows past the checkpoint's step are dropped."""

    def __init__(self, path: Path, start: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start and path.is_file():
            with path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)

    def write(self, row: dict) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
