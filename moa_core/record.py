"""Router maps recorded while sampling: r1 of the cond rows, per sampling step and MoA layer."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class RouterRecord:
    """The router maps of the latest sampling run.

    The patch adds one map per (step, layer) as sampling goes; `begin_run` starts over. Maps stay
    on the device they were made on (no sync while sampling) in half precision until read.
    """

    def __init__(self, layer_paths: Sequence[str]) -> None:
        self.layer_paths = tuple(layer_paths)
        self.sigmas: tuple[float, ...] = ()
        self.runs = 0
        self._maps: dict[tuple[int, int], torch.Tensor] = {}

    def begin_run(self, sigmas: Sequence[float]) -> None:
        """Forget the previous run; `sigmas` is the new run's schedule (steps + 1 values)."""
        self._maps = {}
        self.sigmas = tuple(float(s) for s in sigmas)
        self.runs += 1

    def add(self, step: int, layer: int, r1: torch.Tensor) -> None:
        """Keep r1 [b, h, w] of `layer` (index into layer_paths) at sampling `step`."""
        self._maps[(step, layer)] = r1.detach().to(torch.float16)

    def step_of(self, sigma: float) -> int:
        """Index of the schedule sigma closest to `sigma`."""
        return min(range(len(self.sigmas)), key=lambda i: abs(self.sigmas[i] - sigma)) if self.sigmas else 0

    def steps(self) -> list[int]:
        return sorted({step for step, _ in self._maps})

    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self._maps})

    def get(self, step: int, layer: int) -> torch.Tensor | None:
        return self._maps.get((step, layer))

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
                r1 = self._maps.get((step, layer))
                if r1 is not None:
                    resized = F.interpolate(r1.float().cpu()[:, None], size=size, mode="bilinear", align_corners=False)
                    out[i, j] = resized[:batch, 0]
        return out.clamp_(0.0, 1.0)
