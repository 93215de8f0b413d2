"""Tier 2: what a finished sampling run leaves behind (issue 17). A server runs prompt after prompt on
the same patched model: the per-call plans and fused subject contexts must go with their call, and a
router record must keep a bounded number of finished runs, each findable by its own samples."""

import gc

import torch

from comfyui_moa.moa_core.record import KEPT_RUNS
from comfyui_moa.nodes.host.patch import MoAStep
from moa_testing.tiny import sample


def live(kind: type) -> list:
    gc.collect()
    return [obj for obj in gc.get_objects() if type(obj) is kind]


def test_no_call_plan_or_fused_context_outlives_its_run(conds, apply, trained):
    patched, record = apply(trained, record=True)
    before = len(live(MoAStep))
    for seed in range(3):
        sample(patched, *conds, seed=seed)
    assert len(live(MoAStep)) == before, "MoAStep objects (and the fused contexts they cache) outlived their calls"
    assert record.runs == 3


def test_a_record_keeps_a_bounded_number_of_runs_each_found_by_its_samples(conds, apply, trained):
    patched, record = apply(trained, record=True)
    outputs = [sample(patched, *conds, seed=seed) for seed in range(KEPT_RUNS + 3)]
    assert len(record._finished) == KEPT_RUNS
    assert record.of_samples(outputs[0]) is None
    last = record.of_samples(outputs[-1])
    again = sample(patched, *conds, seed=KEPT_RUNS + 2)  # the same prompt again: the same maps
    assert torch.equal(again, outputs[-1])
    for step in last.steps():
        for layer in last.layers():
            assert torch.equal(last.get(step, layer), record.of_samples(again).get(step, layer))
