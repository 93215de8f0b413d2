import pytest
import torch

from comfyui_moa.moa_core.record import RouterRecord

PATHS = ["input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn2", "mid.attn2"]
SIGMAS = [14.6, 7.0, 3.0, 0.0]


def constant(value: float, b: int = 2, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.full((b, h, w), value)


def recorded() -> RouterRecord:
    record = RouterRecord(PATHS)
    record.begin_run(SIGMAS)
    for step in (0, 2):
        for layer in (0, 2):
            record.add(step, layer, constant((10 * step + layer) / 100))
    return record


def test_begin_run_forgets_earlier_maps_and_stores_the_schedule():
    record = recorded()
    assert record.get(0, 0) is not None
    record.begin_run([1, 0.5, 0])
    assert record.sigmas == (1.0, 0.5, 0.0)
    assert all(isinstance(s, float) for s in record.sigmas)
    assert record.runs == 2
    assert record.get(0, 0) is None
    assert record.steps() == [] and record.layers() == []


def test_add_keeps_a_detached_half_precision_copy():
    record = RouterRecord(PATHS)
    r1 = torch.rand(1, 3, 5, requires_grad=True)
    record.add(1, 2, r1)
    kept = record.get(1, 2)
    assert kept.dtype == torch.float16 and not kept.requires_grad
    assert torch.equal(kept, r1.detach().half())
    assert record.get(2, 1) is None


def test_steps_and_layers_are_the_sorted_recorded_indices():
    record = RouterRecord(PATHS)
    for step, layer in ((3, 1), (0, 2), (3, 2), (1, 1)):
        record.add(step, layer, constant(0.5))
    assert record.steps() == [0, 1, 3]
    assert record.layers() == [1, 2]


@pytest.mark.parametrize(
    ("sigma", "step"), [(14.6, 0), (100.0, 0), (6.0, 1), (4.0, 2), (1.6, 2), (1.4, 3), (0.1, 3), (-1.0, 3)]
)
def test_step_of_picks_the_closest_sigma(sigma, step):
    record = RouterRecord(PATHS)
    record.begin_run(SIGMAS)
    assert record.step_of(sigma) == step


def test_step_of_without_a_schedule_is_step_zero():
    assert RouterRecord(PATHS).step_of(3.0) == 0


def test_stack_resizes_every_map_into_steps_by_layers():
    out = recorded().stack((8, 6), layers=[0, 2], steps=[0, 2], batch=2)
    assert out.shape == (2, 2, 2, 8, 6)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    for i, step in enumerate((0, 2)):
        for j, layer in enumerate((0, 2)):
            expected = torch.tensor((10 * step + layer) / 100).half().float()  # kept in half precision
            torch.testing.assert_close(out[i, j], expected.expand(2, 8, 6), rtol=0, atol=1e-6)


def test_stack_resizes_bilinearly_without_corner_alignment():
    record = RouterRecord(PATHS)
    record.add(0, 0, torch.tensor([[[0.0, 1.0]]]))  # [b=1, h=1, w=2]
    row = record.stack((1, 4), layers=[0], steps=[0], batch=1)[0, 0, 0, 0]
    # half-pixel centres: output x=0..3 samples input at x=-0.25, 0.25, 0.75, 1.25 (clamped to the edges)
    torch.testing.assert_close(row, torch.tensor([0.0, 0.25, 0.75, 1.0]), rtol=0, atol=1e-6)


def test_stack_chooses_steps_and_layers_in_the_given_order():
    out = recorded().stack((4, 4), layers=[2, 0], steps=[2], batch=2)
    assert out.shape == (1, 2, 2, 4, 4)
    torch.testing.assert_close(out[0, 0], torch.full((2, 4, 4), 0.22).half().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 1], torch.full((2, 4, 4), 0.20).half().float(), rtol=0, atol=1e-6)


def test_stack_clamps_to_the_unit_interval():
    record = RouterRecord(PATHS)
    record.add(0, 0, torch.tensor([[[-0.5, 1.5], [0.25, 1.0]]]))
    out = record.stack((2, 2), layers=[0], steps=[0], batch=1)[0, 0, 0]
    assert torch.equal(out, torch.tensor([[0.0, 1.0], [0.25, 1.0]]))


def test_a_step_or_layer_without_a_map_is_all_prior():
    out = recorded().stack((4, 4), layers=[2, 1], steps=[0, 1], batch=2)
    assert out.shape == (2, 2, 2, 4, 4)
    assert out[0, 0].min() > 0  # recorded
    assert torch.equal(out[0, 1], torch.zeros(2, 4, 4)) and torch.equal(out[1], torch.zeros(2, 2, 4, 4))


def test_stack_keeps_the_first_rows_of_the_batch():
    record = RouterRecord(PATHS)
    record.add(0, 0, torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]))
    assert torch.equal(record.stack((2, 2), layers=[0], steps=[0], batch=1)[0, 0], torch.zeros(1, 2, 2))


def test_stack_needs_a_step_and_a_layer():
    with pytest.raises(ValueError, match="at least one step and one layer"):
        RouterRecord(PATHS).stack((4, 4), layers=[], steps=[0], batch=1)


def one_run(record: RouterRecord, value: float, seed: int) -> torch.Tensor:
    """A finished run whose maps are all `value`; returns the samples it 'produced'."""
    record.begin_run(SIGMAS)
    record.add(0, 0, constant(value))
    samples = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    record.end_run(samples)
    return samples


def test_each_finished_run_is_found_by_its_own_samples_even_after_later_runs():
    record = RouterRecord(PATHS)
    first, second = one_run(record, 0.25, seed=1), one_run(record, 0.75, seed=2)
    assert record.of_samples(first).get(0, 0).unique().item() == 0.25
    assert record.of_samples(second).get(0, 0).unique().item() == 0.75
    # as ComfyUI may hand them on: cast to half precision
    assert record.of_samples(first.half()).get(0, 0).unique().item() == 0.25


def test_samples_of_no_finished_run_find_nothing_not_the_latest_maps():
    record = RouterRecord(PATHS)
    finished = one_run(record, 0.25, seed=1)
    record.begin_run(SIGMAS)  # a run that is interrupted: never ended
    record.add(0, 0, constant(0.9))
    assert record.of_samples(torch.randn(2, 4, 8, 8)) is None
    assert record.of_samples(finished[:1]) is None  # another shape
    assert record.of_samples(finished).get(0, 0).unique().item() == 0.25


def test_only_the_last_kept_runs_stay_findable():
    from comfyui_moa.moa_core.record import KEPT_RUNS

    record = RouterRecord(PATHS)
    samples = [one_run(record, i / 100, seed=i) for i in range(KEPT_RUNS + 2)]
    assert record.of_samples(samples[0]) is None and record.of_samples(samples[1]) is None
    assert all(record.of_samples(s) is not None for s in samples[2:])
