"""Tier 2: MoA under ComfyUI's own TorchCompileModel node (inductor, on the CPU, a tiny SD1.5).

Compiled MoA gives uncompiled MoA's output to float tolerance, and the patch costs dynamo nothing
of its own: no graph break of a kind the base model does not have (the host's: its sub-quadratic
attention asks psutil for free memory; MoA's sigma read and sparse gathers happen outside the
compiled model), more steps recompile only what the base model recompiles, and a new strength or
resolution compiles at most what a new resolution costs the base model (a new strength: nothing
on ComfyUI 0.3.64 and 0.33, 4 frames on 0.8). The base model and MoA each run the same sequence of
samplings from a fresh dynamo, and the counts are compared."""

import pytest
import torch

from comfyui_moa.moa_core import PersonalPrompt
from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa
from moa_testing.tiny import moa_weights_for, model_patcher, sample, text_cond


def compiled(model):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, "inductor").args[0]


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, frames compiled) since the last reset."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["frames"]["ok"]


def counts_over_runs(make_model) -> tuple[list[tuple[int, int]], set[str], list[torch.Tensor]]:
    """Dynamo's counts after each of: 3 steps, the same again, 5 steps, the strength changed, 48 px
    latents; the graph breaks' reasons; and the samples of the first run and of the changed strength.
    `make_model(strength)` gives the (uncompiled) model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    conds = (text_cond(1), text_cond(2))
    model = compiled(make_model(1.0))
    counts, changed, first = [], [], sample(model, *conds, steps=3)
    counts.append(dynamo_counts())
    for run in (
        lambda: sample(model, *conds, steps=3),
        lambda: sample(model, *conds, steps=5),
        lambda: changed.append(sample(compiled(make_model(0.7)), *conds, steps=3)),
        lambda: sample(model, *conds, steps=3, size=48),
    ):
        run()
        counts.append(dynamo_counts())
    return counts, set(counters["graph_break"]), [first, *changed]


@pytest.fixture(scope="module")
def runs():
    from moa_testing.tiny import tiny_sd15

    base = tiny_sd15(0)
    weights = model_patcher(moa_weights_for(base, seed=7))
    prompt = PersonalPrompt.single(77, [5], [0], torch.randn(1, 768, generator=torch.Generator().manual_seed(3)))

    def moa(strength):
        return apply_moa(base, weights, prompt, MoAOptions(strength=strength), None)

    base_counts, base_breaks, _ = counts_over_runs(lambda strength: base)
    moa_counts, moa_breaks, moa_compiled = counts_over_runs(moa)
    torch._dynamo.reset()
    eager = [sample(moa(strength), text_cond(1), text_cond(2), steps=3) for strength in (1.0, 0.7)]
    print(f"dynamo (graph breaks, frames) after each run: base {base_counts}, MoA {moa_counts}")
    return base_counts, moa_counts, base_breaks, moa_breaks, moa_compiled, eager


def test_compiled_moa_gives_uncompiled_moas_output_also_after_the_strength_changed(runs):
    *_, moa_compiled, eager = runs
    strength_step = (eager[0] - eager[1]).abs().max()  # what strength 1 -> 0.7 changes: 0.054 of 309
    assert strength_step > 1e-3
    for compiled_samples, eager_samples in zip(moa_compiled, eager, strict=True):
        difference = (compiled_samples - eager_samples).abs().max()
        print(f"max |compiled - eager| = {difference:.3g}, strength 1 -> 0.7: {strength_step:.3g}")
        # inductor sums in its own order: 1.2e-4 on ComfyUI 0.3.64, 9.2e-3 on 0.8 and 0.33
        assert difference < 0.25 * strength_step


def test_the_patch_adds_no_graph_break_of_its_own(runs):
    base_counts, moa_counts, base_breaks, moa_breaks, *_ = runs
    assert moa_breaks <= base_breaks, [reason.splitlines()[0] for reason in moa_breaks - base_breaks]
    # ComfyUI 0.3.64 and 0.8: as many as the base model; 0.33: 4 more of the host's psutil break
    assert moa_counts[0][0] <= base_counts[0][0] + 4


def test_steps_recompile_only_what_the_host_does_and_strength_or_resolution_at_most_a_resolutions_worth(runs):
    base_counts, moa_counts, *_ = runs
    frames = [f for _, f in moa_counts]
    base_frames = [f for _, f in base_counts]
    assert frames[1] == frames[0], "the same sampling again compiled something"
    assert frames[2] - frames[1] == base_frames[2] - base_frames[1], "more steps: MoA compiled more than the host"
    # a new strength: nothing on ComfyUI 0.3.64 and 0.33; 0.8 (whose TorchCompileModel drops every guard on
    # transformer_options) recompiles 4 frames, fewer than a new resolution costs the base model
    assert frames[3] - frames[2] <= base_frames[4] - base_frames[3], "a new strength: more than a new resolution"
    assert frames[4] - frames[3] <= base_frames[4] - base_frames[3], "a new resolution: more compiles than the host"
