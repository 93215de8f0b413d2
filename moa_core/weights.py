"""MoA weights: the module that holds them, "MoA init", and the safetensors file format.

A file holds, per attention layer (keyed by UNet path), the router and the deltas of the personal
q/k/v/out projections, plus the fuser. Its `__metadata__` says what it is:

    format          "comfyui-moa"
    format_version  "1"
    config          JSON of MoAConfig: family, layers with their shapes, delta rank, router and
                    fuser architecture, the image encoder it expects, training facts

`validate_metadata` and `load_weights` check all of it and say exactly what is wrong. Only
safetensors is read: no pickle is ever loaded.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import WeightsFormatError
from .fuser import Fuser, FuserConfig
from .layer import MoALayer
from .unet_layout import FAMILY_BLOCKS, LayerSpec, block_key

FORMAT = "comfyui-moa"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ImageEncoderSpec:
    """The image encoder whose embeddings the fuser was trained on."""

    name: str = "clip-vit-large-patch14"
    output: str = "image_embeds"  # field of ComfyUI's CLIP-vision output
    dim: int = 768


@dataclass(frozen=True)
class MoAConfig:
    family: str  # "sd15" or "sdxl"
    layers: tuple[LayerSpec, ...]
    fuser: FuserConfig
    image_encoder: ImageEncoderSpec = ImageEncoderSpec()
    delta_rank: int = 0  # 0: full-rank deltas
    router_hidden_ratio: float = 0.25
    training: dict[str, Any] = field(default_factory=dict)  # facts only: base model, steps, data

    @property
    def cross_layers(self) -> list[int]:
        """Indices into `layers` of the cross-attention layers, in UNet order."""
        return [i for i, spec in enumerate(self.layers) if spec.is_cross]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class MoAWeights(nn.Module):
    """Every trainable part of MoA for one model: a MoALayer per attention layer and the fuser."""

    def __init__(self, config: MoAConfig, prior_init: float = 0.9) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            MoALayer(spec, config.delta_rank, config.router_hidden_ratio, prior_init) for spec in config.layers
        )
        self.fuser = Fuser(config.fuser)
        cross = config.cross_layers
        self.cross_index = {layer: i for i, layer in enumerate(cross)}
        """Layer index -> index among the cross-attention layers (the fuser's layer id)."""

    @property
    def paths(self) -> list[str]:
        return [spec.path for spec in self.config.layers]

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed as in the file: `<layer path>.<param>` and `fuser.<param>`."""
        out = {}
        for spec, layer in zip(self.config.layers, self.layers, strict=True):
            for name, tensor in layer.state_dict().items():
                out[f"{spec.path}.{name}"] = tensor
        for name, tensor in self.fuser.state_dict().items():
            out[f"fuser.{name}"] = tensor
        return out

    def load_file_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = {name: t.shape for name, t in self.file_state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(n for n in set(expected) & set(tensors) if tensors[n].shape != expected[n])
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (first: {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors its metadata does not declare (first: {unexpected[0]})")
        if wrong:
            n = wrong[0]
            problems.append(
                f"{len(wrong)} tensors of the wrong shape "
                f"(first: {n} is {list(tensors[n].shape)}, metadata says {list(expected[n])})"
            )
        if problems:
            raise WeightsFormatError(
                f"{source}: the tensors do not match the file's own metadata: {'; '.join(problems)}. "
                "The file is damaged or was edited; write it again with the MoA trainer or 'MoA init'"
            )
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            module, param = _split_key(name)
            by_module.setdefault(module, {})[param] = tensor
        for spec, layer in zip(self.config.layers, self.layers, strict=True):
            layer.load_state_dict(by_module[spec.path], assign=True)
        self.fuser.load_state_dict(by_module["fuser"], assign=True)


def _split_key(name: str) -> tuple[str, str]:
    """ "input_blocks.1.1.transformer_blocks.0.attn1.router.fc1.weight" -> (layer path, param)."""
    if name.startswith("fuser."):
        return "fuser", name[len("fuser.") :]
    for attn in (".attn1.", ".attn2."):
        head, sep, tail = name.partition(attn)
        if sep:
            return head + attn[:-1], tail
    raise ValueError(name)


def moa_init(
    family: str,
    layers: list[LayerSpec],
    fuser: FuserConfig | None = None,
    image_encoder: ImageEncoderSpec = ImageEncoderSpec(),
    delta_rank: int = 0,
    router_hidden_ratio: float = 0.25,
    prior_init: float = 0.9,
) -> MoAWeights:
    """An untrained MoA for a model's attention layers: zero deltas, a fuser that returns the word
    token, routers giving the prior `prior_init` of every pixel. Its output is the base model's."""
    if family not in FAMILY_BLOCKS:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILY_BLOCKS)}")
    cross = [spec for spec in layers if spec.is_cross]
    if not cross:
        raise ValueError("MoA needs at least one cross-attention layer")
    if fuser is None:
        fuser = FuserConfig(text_dim=cross[0].context_dim, image_dim=image_encoder.dim)
    if fuser.layer_conditioning:
        fuser = FuserConfig(**{**asdict(fuser), "num_layers": len(cross)})
    config = MoAConfig(family, tuple(layers), fuser, image_encoder, delta_rank, router_hidden_ratio)
    problem = _fuser_misfit(config)
    if problem:
        raise ValueError(f"fuser: {problem}; leave fuser unset to size it from the layers and image encoder")
    return MoAWeights(config, prior_init)


def _fuser_misfit(config: MoAConfig) -> str | None:
    """What keeps the fuser's token from feeding the cross-attention layers (SDXL's context is 2048-d,
    SD1.5's 768-d), or from reading the image encoder's embeddings; None if it fits."""
    widths = sorted({spec.context_dim for spec in config.layers if spec.is_cross})
    if widths != [config.fuser.text_dim]:
        return f"it makes {config.fuser.text_dim}-d tokens but the cross-attention layers read {widths}-d context"
    if config.fuser.image_dim != config.image_encoder.dim:
        return (
            f"it reads {config.fuser.image_dim}-d image embeddings but the image encoder "
            f"{config.image_encoder.name!r} gives {config.image_encoder.dim}-d"
        )
    return None


def save_weights(weights: MoAWeights, path: str | Path) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in weights.file_state_dict().items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": weights.config.to_json()}
    save_file(tensors, str(path), metadata=metadata)


def _dataclass_from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise WeightsFormatError(f"metadata field {where} must be an object, found {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightsFormatError(
            f"metadata field {where} has unknown keys {unknown}; the file may be from a newer version of the pack"
        )
    try:
        return cls(**data)
    except TypeError as e:
        raise WeightsFormatError(f"metadata field {where} is incomplete: {e}") from None


def validate_metadata(metadata: dict[str, str] | None, source: str) -> MoAConfig:
    """The MoAConfig a file's `__metadata__` describes; WeightsFormatError if it is not MoA weights."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        found = f"format {metadata['format']!r}" if "format" in metadata else "no MoA metadata"
        raise WeightsFormatError(
            f"{source} is not an MoA weights file ({found}). Checkpoints go to models/checkpoints, "
            "LoRAs to models/loras; models/moa holds files written by the MoA trainer or 'MoA init'"
        )
    version = metadata.get("format_version", "")
    if not (version.isascii() and version.isdecimal()):
        raise WeightsFormatError(f"{source}: format_version {version!r} is not a number; the file is damaged")
    if int(version) > FORMAT_VERSION:
        raise WeightsFormatError(
            f"{source} has MoA format version {version}; this pack reads up to {FORMAT_VERSION}. Update ComfyUI-MoA"
        )
    try:
        data = json.loads(metadata.get("config", ""))
    except json.JSONDecodeError as e:
        raise WeightsFormatError(f"{source}: metadata 'config' is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(data, dict):
        raise WeightsFormatError(f"{source}: metadata 'config' must be a JSON object")
    if data.get("family") not in FAMILY_BLOCKS:
        raise WeightsFormatError(
            f"{source}: model family {data.get('family')!r} is not supported; "
            f"this pack knows {', '.join(FAMILY_BLOCKS)}"
        )
    if not isinstance(data.get("layers"), list) or not data["layers"]:
        raise WeightsFormatError(f"{source}: metadata 'config.layers' must be a non-empty list")
    layers = tuple(_dataclass_from(LayerSpec, layer, f"config.layers[{i}]") for i, layer in enumerate(data["layers"]))
    for i, spec in enumerate(layers):
        _check_layer_path(spec.path, f"{source}: config.layers[{i}]")
    if len({spec.path for spec in layers}) != len(layers):
        raise WeightsFormatError(f"{source}: config.layers names a layer twice; the file is damaged")
    fuser = _dataclass_from(FuserConfig, data.get("fuser"), "config.fuser")
    encoder = _dataclass_from(ImageEncoderSpec, data.get("image_encoder", {}), "config.image_encoder")
    rest = {k: v for k, v in data.items() if k not in ("layers", "fuser", "image_encoder")}
    config = _dataclass_from(MoAConfig, {**rest, "layers": layers, "fuser": fuser, "image_encoder": encoder}, "config")
    if fuser.layer_conditioning and fuser.num_layers != len(config.cross_layers):
        raise WeightsFormatError(
            f"{source}: the fuser indexes {fuser.num_layers} cross-attention layers but the file has "
            f"{len(config.cross_layers)}; the file is damaged"
        )
    problem = _fuser_misfit(config)
    if problem:
        raise WeightsFormatError(
            f"{source}: the fuser does not fit the file's own layers ({problem}); the file is damaged"
        )
    return config


def _check_layer_path(path: str, where: str) -> None:
    block, _, attn = path.rpartition(".")
    try:
        block_key(block)
    except ValueError:
        block = None
    if block is None or attn not in ("attn1", "attn2"):
        raise WeightsFormatError(
            f"{where}: {path!r} is no UNet attention layer (<transformer block path>.attn1 or .attn2)"
        )


def read_config(path: str | Path) -> MoAConfig:
    """The config of an MoA weights file, read from its header only (no tensors loaded)."""
    with _open(path) as f:
        return validate_metadata(f.metadata(), Path(path).name)


def load_weights(path: str | Path, dtype: torch.dtype | None = None) -> MoAWeights:
    """Load and validate an MoA weights file onto the CPU (in `dtype` if given)."""
    name = Path(path).name
    with _open(path) as f:
        config = validate_metadata(f.metadata(), name)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.device("meta"):  # no time spent initialising what the file overwrites
        weights = MoAWeights(config)
    weights.load_file_state_dict(tensors, name)
    if dtype is not None:
        weights.to(dtype)
    return weights.eval().requires_grad_(False)


def _open(path: str | Path):
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsFormatError(
            f"{path.name}: MoA weights are .safetensors files; {path.suffix or 'extensionless'} files are "
            "never opened because they may hold pickled code"
        )
    if not path.is_file():
        raise WeightsFormatError(f"{path}: no such file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFormatError(
            f"{path.name} is not a readable safetensors file ({e}); download or write it again"
        ) from None
