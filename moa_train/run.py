"""The training loop: one process or many (torchrun + DistributedDataParallel), checkpoints and
exact resume, a progress bar, a CSV log, previews, and the weights file the loader node reads."""

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from comfyui_moa.moa_core import save_weights
from comfyui_moa.moa_core.errors import ConfigError

from .config import TrainConfig
from .data import open_layout
from .models import Models, build_weights, load_models, training_facts, training_model
from .preview import preview_image, sample_with_router_record, write_preview
from .samples import CaptionBinder, StepBatches, TrainingSamples, collate
from .state import (
    CsvLog,
    check_frozen,
    checkpoint_path,
    find_checkpoint,
    frozen_digests,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .step import TrainingModel

logger = logging.getLogger(__name__)
LOGGED = ("loss", "masked_diffusion", "router", "router_subject", "object", "prior_background", "prior_subject")
"""What a step reports: its losses and the mean prior weight r0 on background and subject pixels."""


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class RunResult:
    weights_path: Path
    steps: int
    skipped: int
    train_seconds: float  # time in training steps (setup, checkpoints and previews excluded)
    history: list[dict] = field(default_factory=list)  # per step, on the main process


def setup_distributed(device: str) -> Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> a process group: nccl on GPUs,
    gloo on CPUs. A plain `python -m moa_train` is a world of one."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('[run] device = "cuda" but torch sees no GPU; use "cpu" or "auto"')
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    where = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank, world, where)


def run(config: TrainConfig, models: Models | None = None) -> RunResult:
    """Train MoA weights as `config` says, on `models` (else the files it names)."""
    place = setup_distributed(config.run.device)
    try:
        return _Run(config, models or load_models(config, place.device.type == "cuda"), place).train()
    finally:
        if place.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One process's share of a training run."""

    def __init__(self, config: TrainConfig, models: Models, place: Distributed) -> None:
        self.config, self.models, self.place = config, models, place
        self.output, opt = Path(config.run.output), config.optim
        self.global_batch = opt.batch_size * opt.grad_accum * place.world
        self.module, self.weights_patcher = training_model(config, models, build_weights(config, models), place.device)
        self.host = {"unet": models.model.model, "clip": models.clip.cond_stage_model,
                     "vae": models.vae.first_stage_model, "vision": models.vision.model}  # fmt: skip
        groups = _param_groups(self.module, config)
        self.optimizer = torch.optim.AdamW(groups, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.settings = {"training": config.training_fingerprint(), "global_batch": self.global_batch}
        self.start, self.skipped = 0, 0
        if config.run.resume:
            checkpoint = find_checkpoint(self.output, config.run.resume)
            resumed = load_checkpoint(checkpoint, self.module, self.optimizer, self.settings)
            self.start, self.skipped = resumed.step, resumed.skipped
            logger.info("resumed from %s at step %d", checkpoint.name, self.start)
        self.binder = CaptionBinder(models.clip)
        data = config.data
        layout = open_layout(data.layout, data.root, data.split, data.object_types)
        self.samples = TrainingSamples(layout, data, config.run.seed, self.global_batch, self.binder)

    def train(self) -> RunResult:
        config, place, module = self.config, self.place, self.module
        before = frozen_digests(self.host, {id(p) for p in module.parameters()})
        trainer = module
        if place.world > 1:
            ids = [place.device.index] if place.device.type == "cuda" else None
            trainer = DistributedDataParallel(module, ids, find_unused_parameters=True, broadcast_buffers=False)
        opt = config.optim
        sampler = StepBatches(self.start, config.run.steps, opt.batch_size, opt.grad_accum, place.rank, place.world)
        batches = iter(
            DataLoader(self.samples, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.workers)
        )
        self._open_reporting()
        history, seconds = [], 0.0
        for step in range(self.start + 1, config.run.steps + 1):
            began = time.perf_counter()
            stats = _optimizer_step(trainer, self.optimizer, batches, config, place)
            seconds += time.perf_counter() - began
            self.skipped += int(stats.pop("skipped"))
            row = {"step": step, **stats, "skipped": self.skipped}
            if place.main:
                history.append(row)
                self._report(row)
        if place.main:
            self.progress.close()
            self.log.close()
        check_frozen(before, frozen_digests(self.host, {id(p) for p in module.parameters()}))
        path = self.output / f"{config.run.name}.safetensors"
        if place.main:
            _save_result(config, self.models, module, path, self.global_batch, self.skipped)
        return RunResult(path, config.run.steps, self.skipped, seconds, history)

    def _open_reporting(self) -> None:
        run, main = self.config.run, self.place.main
        self.preview = self.samples.fixed_example(0, 0.0) if main and run.preview_every else None
        if main:
            self.log = CsvLog(self.output / "log.csv", self.start)
            self.progress = tqdm(total=run.steps, initial=self.start, disable=not run.progress, unit="step")

    def _report(self, row: dict) -> None:
        """The main process after each step: progress bar, CSV log, checkpoints, previews."""
        run, step = self.config.run, row["step"]
        self.log.write(row)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{row['loss']:.4f}", prior_bg=f"{row['prior_background']:.3f}")
        if run.log_every and step % run.log_every == 0:
            self.log.flush()
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
        done = step == run.steps
        if done or (run.save_every and step % run.save_every == 0):
            path = checkpoint_path(self.output, step)
            save_checkpoint(path, step, self.skipped, self.module, self.optimizer, self.settings)
            prune_checkpoints(self.output, run.keep_checkpoints)
        if self.preview is not None and (done or step % run.preview_every == 0):
            options = {"steps": run.preview_steps, "cfg": run.preview_cfg, "seed": run.seed}
            image, record = sample_with_router_record(
                self.models, self.weights_patcher, self.preview, self.binder, self.module.vision_layers, options
            )
            picture = preview_image(image, record, self.preview.crops)
            write_preview(self.output / "previews" / f"step_{step:08d}.png", picture)


def _param_groups(module: TrainingModel, config: TrainConfig) -> list[dict]:
    named = list(module.weights.named_parameters())
    groups = [
        ("deltas", [p for n, p in named if ".delta_" in n], config.optim.lr_deltas),
        ("routers", [p for n, p in named if ".router." in n], config.optim.lr_routers),
        ("fuser", [p for n, p in named if n.startswith("fuser.")], config.optim.lr_fuser),
        ("vision", list(module.vision_layers.parameters()), config.optim.lr_vision),
    ]
    assert sum(len(params) for _, params, _ in groups) == len(list(module.parameters())), "a parameter in no group"
    return [{"name": name, "params": params, "lr": lr} for name, params, lr in groups if params]


def _optimizer_step(trainer, optimizer, batches, config: TrainConfig, place: Distributed) -> dict:
    """One optimizer step over `grad_accum` micro-batches; the logged values averaged over processes."""
    accum = config.optim.grad_accum
    totals = torch.zeros(len(LOGGED) + 1, dtype=torch.float64)
    for micro in range(accum):
        batch = next(batches)
        last = micro == accum - 1
        with trainer.no_sync() if place.world > 1 and not last else contextlib.nullcontext():
            out = trainer(batch)
            (out["loss"] / accum).backward()
        totals[:-1] += torch.stack([out[k].detach().double().cpu() for k in LOGGED]) / accum
        totals[-1] += batch.skipped
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if place.world > 1:
        totals = totals.to(place.device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        totals[:-1] /= place.world
    stats = dict(zip(LOGGED, totals[:-1].tolist(), strict=True))
    return {**stats, "grad_norm": float(norm), "skipped": totals[-1].item()}


def _save_result(
    config: TrainConfig, models: Models, module: TrainingModel, path: Path, batch: int, skipped: int
) -> None:
    """The weights file (with the training facts), and a trained CLIP-vision tail beside it."""
    weights = module.weights
    facts = training_facts(config, models, config.run.steps, batch, skipped)
    weights.config = replace(weights.config, training=facts)
    save_weights(weights, path)
    if len(module.vision_layers):
        # the fine-tuned image encoder goes beside the weights, in the format ComfyUI's CLIP vision loader reads
        state = {k: v.detach().float().cpu().contiguous() for k, v in models.vision.get_sd().items()}
        save_file(state, str(path.with_suffix(".clip_vision.safetensors")))
    logger.info("wrote %s", path)
