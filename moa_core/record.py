"""Router maps recorded while sampling: r1 of the cond rows, per sampling step and MoA layer."""

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

KEPT_RUNS = 8
"""Finished runs whose maps a record keeps findable by their samples (`of_samples`): a queue of
prompts sharing one cached MoA Apply output, or a two-pass graph, reads each run's own maps."""
SAMPLES_PROBE = 256  # values of the samples that identify a run


class RouterRecord:
    """The router maps of the latest sampling run, and of the last KEPT_RUNS finished ones.

    The patch adds one map per (step, layer) as sampling goes; `begin_run` starts over, `end_run`
    files the run under the samples it produced, so a reader that holds a sampler's output finds
    that run's maps, never another's (an interrupted run is never filed). Maps stay on the device
    they were made on, as the patch made them (no sync, no operation while sampling), until read.
    """

    def __init__(self, layer_paths: Sequence[str]) -> None:
        self.layer_paths = tuple(layer_paths)
        self.sigmas: tuple[float, ...] = ()
        self.runs = 0
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._finished: OrderedDict[int, tuple[tuple[int, ...], torch.Tensor, tuple, dict]] = OrderedDict()

    def begin_run(self, sigmas: Sequence[float]) -> None:
        """Forget the previous run; `sigmas` is the new run's schedule (steps + 1 values)."""
        self._maps = {}
        self.sigmas = tuple(float(s) for s in sigmas)
        self.runs += 1

    def end_run(self, samples: torch.Tensor) -> None:
        """The run begun last produced `samples` (the sampler's output latent): file its maps under them."""
        self._finished[self.runs] = (tuple(samples.shape), _probe(samples), self.sigmas, self._maps)
        while len(self._finished) > KEPT_RUNS:
            self._finished.popitem(last=False)

    def of_samples(self, samples: torch.Tensor) -> "RouterRecord | None":
        """A record of just the finished run that produced `samples` (as the sampler returned them, or
        cast to another dtype or device), or None if no kept run did."""
        probe = _probe(samples)
        for shape, kept, sigmas, maps in reversed(self._finished.values()):
            if shape == tuple(samples.shape) and torch.allclose(kept, probe, rtol=1e-2, atol=1e-2):
                run = RouterRecord(self.layer_paths)
                run.sigmas, run._maps, run.runs = sigmas, maps, 1
                return run
        return None

    def add(
        self, step: int, layer: int, r1: torch.Tensor, rows: torch.Tensor | None = None, hw: tuple | None = None
    ) -> None:
        """Keep r1 [b, h, w] of `layer` (index into layer_paths) at sampling `step`; or, with `rows` and
        `hw`, r1 [B, h * w, 1] of every batch row, of which the map is rows `rows`. The map is cut out and
        cast when it is read: while sampling, keeping it launches no operation."""
        self._maps[(step, layer)] = (r1.detach() if r1.requires_grad else r1, rows, hw)

    def step_of(self, sigma: float) -> int:
        """Index of the schedule sigma closest to `sigma`."""
        return min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - sigma)) if self.sigmas else 0

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self._maps})

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self._maps})

    def get(self, step: int, layer: int) -> torch.Tensor | None:
        """The map [b, h, w] (float16) of `layer` at `step`, or None."""
        kept = self._maps.get((step, layer))
        if kept is None:
            return None
        r1, rows, hw = kept
        if rows is not None:
            r1 = r1[rows, :, 0].reshape(-1, *hw)
        return r1.to(torch.float16)

    def stack(
        self,
        size: tuple[int, int],
        layers: Sequence[int],
        steps: Sequence[int],
        batch: int,
    ) -> torch.Tensor:
        """Maps resized to `size` (H, W): float32 [T, L, b, H, W] on the CPU for the chosen steps and
        layers. A (step, layer) with no map is all zeros: MoA did not act there, the prior painted it."""
        if not steps or not layers:
            raise ValueError("choose at least one step and one layer")
        out = torch.zeros(len(steps), len(layers), batch, *size)
        for i, step in enumerate(steps):
            for j, layer in enumerate(layers):
                r1 = self.get(step, layer)
                if r1 is not None:
                    resized = F.interpolate(r1.float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)
                    out[i, j] = resized[:batch, 0]
        return out.clamp_(0.0, 1.0)


def _probe(samples: torch.Tensor) -> torch.Tensor:
    """SAMPLES_PROBE evenly spaced values of `samples`, float32 on the CPU: two sampling runs from
    different noise differ in all of them; a cast to fp16 moves them by under 1e-2."""
    flat = samples.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, min(SAMPLES_PROBE, flat.numel()), device=flat.device).long()
    return flat[index].float().cpu()
