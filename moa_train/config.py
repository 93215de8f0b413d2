"""The trainer's settings: a TOML file read into a frozen, validated TrainConfig.

Every setting has a default (the paper notes' recipe for SD1.5 on FFHQ-wild); a file names only
what it changes. Unknown sections and keys are errors, so a typo never trains with a default.
Relative paths in a file are relative to the file's folder.
"""

import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from comfyui_moa.moa_core.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

LAYOUTS = ("ffhq-wild", "folder")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16")
WEIGHTINGS = ("eps", "v")


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str = ""  # SD1.5 checkpoint, loaded with ComfyUI's loader
    world: str = ""  # a small-world folder (moa_world): its prior, text encoder, VAE and subject encoder
    clip_vision: str = ""  # CLIP ViT-L/14 vision model, loaded with comfy.clip_vision.load
    image_encoder: str = "clip-vit-large-patch14"  # the encoder's name written into the weights
    unet_dtype: str = "auto"  # auto: bf16 on a GPU, fp32 on the CPU


@dataclass(frozen=True)
class DataSettings:
    root: str = ""
    layout: str = "ffhq-wild"  # or "folder": x.jpg, x.txt and one x.<word>.png mask per subject
    split: str = "train"  # ffhq-wild: reads image_ids_<split>.txt
    object_types: tuple[str, ...] = ("person",)  # ffhq-wild: coco labels that count as subjects
    resolution: int = 512  # training image side
    subject_resolution: int = 224  # subject crop side (CLIP ViT-L/14 input)
    max_subjects: int = 4
    uncondition_prob: float = 0.1  # empty caption, no subjects (for classifier-free guidance)
    subject_keep_prob: float = 0.9  # each subject keeps its image with this probability
    augment: bool = True  # FastComposer's subject augmentations
    workers: int = 4  # DataLoader worker processes per training process


@dataclass(frozen=True)
class MoASettings:
    init: str = ""  # start from this MoA weights file instead of "MoA init"
    delta_rank: int = 0  # 0: full-rank deltas
    router_hidden_ratio: float = 0.25
    prior_init: float = 0.9  # the untrained router's prior weight
    timestep_conditioning: bool = True
    layer_conditioning: bool = True
    fuser_hidden_dim: int = 0  # 0: the text width
    fuser_cond_dim: int = 128


@dataclass(frozen=True)
class LossSettings:
    router_weight: float = 1.0
    # ||M * R||^2, subject pixels to the personal expert: not in the paper (0 is its loss), but without it
    # the routers learned a constant on the small world's prior and on the proof's random ones (docs/training.md)
    router_subject_weight: float = 1.0
    object_weight: float = 1e-3
    router_layers: tuple[str, ...] = ("all",)  # "all", or UNet layer paths
    object_layers: tuple[str, ...] = ("fastcomposer",)  # "fastcomposer", "all", or attn2 layer paths
    weighting: str = "eps"  # the diffusion loss's timestep weighting: "eps" (the paper's) or "v"


@dataclass(frozen=True)
class OptimSettings:
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr_deltas: float = 1e-5
    lr_routers: float = 1e-4
    lr_fuser: float = 1e-4  # the paper notes give routers and fuser one rate; a slower fuser routes better
    lr_vision: float = 1e-5
    vision_layers: int = 0  # train the last N CLIP-vision layers (saved beside the weights)
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping


@dataclass(frozen=True)
class RunSettings:
    output: str = "runs/moa"
    name: str = "moa_sd15"  # the weights file: <output>/<name>.safetensors
    steps: int = 50_000
    seed: int = 42
    device: str = "auto"
    save_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = ""  # "", "latest", or a checkpoint file
    preview_every: int = 500  # 0: no previews
    preview_steps: int = 20
    preview_cfg: float = 5.0
    log_every: int = 10
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    moa: MoASettings = field(default_factory=MoASettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", base: Path | None = None) -> "TrainConfig":
        """Sections as in the TOML file; relative paths are resolved against `base` when given."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of sections")
        sections = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{source}: unknown section [{unknown[0]}]; the sections are {', '.join(sections)}")
        built = {name: _section(sections[name], data.get(name, {}), f"{source} [{name}]") for name in sections}
        config = cls(**built)
        return config.with_paths(base) if base is not None else config

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
        return cls.from_dict(data, path.name, path.resolve().parent)

    def with_paths(self, base: Path) -> "TrainConfig":
        def resolve(value: str) -> str:
            return str(base / value) if value and not Path(value).is_absolute() else value

        resume = self.run.resume if self.run.resume in ("", "latest") else resolve(self.run.resume)
        return replace(
            self,
            model=replace(
                self.model,
                checkpoint=resolve(self.model.checkpoint),
                clip_vision=resolve(self.model.clip_vision),
                world=resolve(self.model.world),
            ),
            data=replace(self.data, root=resolve(self.data.root)),
            moa=replace(self.moa, init=resolve(self.moa.init)),
            run=replace(self.run, output=resolve(self.run.output), resume=resume),
        )

    def replace(self, section: str, **changes: Any) -> "TrainConfig":
        """A copy with `changes` in one section, validated again."""
        return replace(self, **{section: replace(getattr(self, section), **changes)})

    def training_fingerprint(self) -> dict[str, Any]:
        """The settings that decide what the run computes: a resumed run must match them. Paths
        and the split of the global batch into processes and micro-batches may change."""
        data, moa, optim = asdict(self.data), asdict(self.moa), asdict(self.optim)
        for section, keys in ((data, ("root", "workers")), (moa, ("init",)), (optim, ("batch_size", "grad_accum"))):
            for key in keys:
                section.pop(key)
        return {"data": data, "moa": moa, "loss": asdict(self.loss), "optim": optim, "seed": self.run.seed}


def _section(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(hints)}")
    return cls(**{key: _coerce(value, hints[key], f"{where} {key}") for key, value in data.items()})


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, found {value!r}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, found {len(value)}")
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        return tuple(_coerce(v, item, where) for v, item in zip(value, items, strict=True))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, found {value!r}")
    return value


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _validate(config: TrainConfig) -> None:
    d, m, loss, o, r = config.data, config.moa, config.loss, config.optim, config.run
    _check(d.layout in LAYOUTS, "[data] layout", f"{d.layout!r} is not one of {', '.join(LAYOUTS)}")
    # the model's own multiple (64 for SD1.5: 8x VAE, 3 downsamples) is checked when it is loaded
    _check(d.resolution > 0 and d.resolution % 8 == 0, "[data] resolution", "must be a positive multiple of 8")
    _check(d.subject_resolution >= 16, "[data] subject_resolution", "must be at least 16")
    _check(1 <= d.max_subjects <= 16, "[data] max_subjects", "must be between 1 and 16")
    for name in ("uncondition_prob", "subject_keep_prob"):
        _check(0.0 <= getattr(d, name) <= 1.0, f"[data] {name}", "must be a probability in [0, 1]")
    _check(d.workers >= 0, "[data] workers", "must be 0 (load in the training process) or more")
    _check(m.delta_rank >= 0, "[moa] delta_rank", "must be 0 (full rank) or a positive rank")
    _check(0.0 < m.prior_init < 1.0, "[moa] prior_init", "must lie strictly between 0 and 1")
    _check(m.router_hidden_ratio > 0, "[moa] router_hidden_ratio", "must be positive")
    _check(m.fuser_hidden_dim >= 0 and m.fuser_cond_dim > 0, "[moa] fuser_*", "widths must be positive")
    for name in ("router_weight", "router_subject_weight", "object_weight"):
        _check(getattr(loss, name) >= 0, f"[loss] {name}", "must be 0 or more")
    weighting = f"{loss.weighting!r} is not one of {', '.join(WEIGHTINGS)}"
    _check(loss.weighting in WEIGHTINGS, "[loss] weighting", weighting)
    _check(bool(loss.router_layers), "[loss] router_layers", 'name layers or use ["all"]')
    _check(bool(loss.object_layers), "[loss] object_layers", 'name layers or use ["fastcomposer"] or ["all"]')
    _check(o.batch_size >= 1 and o.grad_accum >= 1, "[optim] batch_size, grad_accum", "must be at least 1")
    for name in ("lr_deltas", "lr_routers", "lr_fuser", "lr_vision", "weight_decay", "eps", "grad_clip"):
        _check(getattr(o, name) >= 0, f"[optim] {name}", "must be 0 or more")
    _check(all(0 <= b < 1 for b in o.betas), "[optim] betas", "must lie in [0, 1)")
    _check(o.vision_layers >= 0, "[optim] vision_layers", "must be 0 (frozen) or more")
    _check(r.steps >= 1, "[run] steps", "must be at least 1")
    _check(r.device in DEVICES, "[run] device", f"{r.device!r} is not one of {', '.join(DEVICES)}")
    _check(config.model.unet_dtype in DTYPES, "[model] unet_dtype", f"must be one of {', '.join(DTYPES)}")
    for name in ("save_every", "preview_every", "keep_checkpoints", "log_every"):
        _check(getattr(r, name) >= 0, f"[run] {name}", "must be 0 or more")
    _check(r.preview_steps >= 1, "[run] preview_steps", "must be at least 1")
    _check(bool(r.name) and "/" not in r.name, "[run] name", "must be a file name without a folder")
