"""Tier 2: the cheaper MoA modes keep the prior exactly where they skip work, and the benchmark runs."""

import pytest
import torch

from comfyui_moa.moa_core import TrainingProbe
from comfyui_moa.moa_core.errors import OptionsError
from comfyui_moa.nodes.host.patch import PROBE_KEY, MoAOptions
from comfyui_moa.nodes.host.unet_layers import attention_modules
from moa_testing.tiny import FAMILIES, sample

both_families = pytest.mark.parametrize("family", FAMILIES)

REPO_BENCHMARKS = __import__("moa_pack").ROOT / "benchmarks"


class OutputLog:
    """attn1/attn2 output patches that keep every layer output they see, in call order."""

    def __init__(self):
        self.outputs = []

    def __deepcopy__(self, memo):  # clone() deep-copies patch lists: keep logging here
        return self

    def __call__(self, n, extra_options, *args, **kwargs):
        self.outputs.append((n.detach().clone(), list(extra_options["cond_or_uncond"])))
        return n


def logged(model, apply, weights, **options):
    """(patched model, outputs before MoA, outputs after MoA) of every attention layer."""
    before, after = OutputLog(), OutputLog()
    model = model.clone()
    model.set_model_attn1_output_patch(before)
    model.set_model_attn2_output_patch(before)
    patched = apply(weights, model=model, **options).clone()
    patched.set_model_attn1_output_patch(after)
    patched.set_model_attn2_output_patch(after)
    return patched, before, after


def centred_square(size: int = 256, area: float = 0.25) -> torch.Tensor:
    region = torch.zeros(size, size)
    side = round(size * area**0.5)
    start = (size - side) // 2
    region[start : start + side, start : start + side] = 1.0
    return region


@both_families
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_a_region_of_zeros_equals_base_model(base_model, conds, apply, trained, threshold):
    patched = apply(trained, region=torch.zeros(64, 64), sparse_threshold=threshold)
    assert torch.equal(sample(patched, *conds), sample(base_model, *conds))


def test_a_region_of_ones_with_threshold_zero_equals_dense(conds, apply, trained):
    dense = sample(apply(trained, sparse_threshold=0.0), *conds)
    assert torch.equal(sample(apply(trained, region=torch.ones(37, 53), sparse_threshold=0.0), *conds), dense)


@both_families
def test_cond_only_leaves_every_uncond_row_of_every_layer_exactly_prior(base_model, conds, apply, trained):
    patched, before, after = logged(base_model, apply, trained, personal_rows="cond")
    sample(patched, *conds, steps=2)
    layers = len(attention_modules(base_model.model.diffusion_model))
    assert len(before.outputs) == len(after.outputs) == 2 * layers
    cond_changed = False
    for (prior, kinds), (mixed, _) in zip(before.outputs, after.outputs, strict=True):
        uncond, cond = kinds.index(1), kinds.index(0)
        assert torch.equal(mixed[uncond], prior[uncond])
        cond_changed |= not torch.equal(mixed[cond], prior[cond])
    assert cond_changed


@both_families
def test_sparse_layers_keep_the_prior_exactly_outside_the_region_and_mix_inside(base_model, conds, apply, trained):
    patched, before, after = logged(base_model, apply, trained, region=centred_square(), sparse_threshold=0.01)
    sample(patched, *conds, steps=1)
    changed_inside = 0
    for (prior, _), (mixed, _) in zip(before.outputs, after.outputs, strict=True):
        side = int(prior.shape[1] ** 0.5)
        outside = centred_square(side) == 0  # the square's edges fall on every level's grid lines
        grid = (mixed != prior).any(dim=-1).reshape(-1, side, side)
        assert not grid[:, outside].any()
        changed_inside += int(grid[:, ~outside].sum())
    assert changed_inside > 0


@pytest.mark.parametrize("threshold", [None, 0.05])
def test_sparse_thresholds_stay_within_one_strength_step_of_dense(base_model, conds, apply, trained, threshold):
    base = sample(base_model, *conds)
    dense = sample(apply(trained, sparse_threshold=0.0), *conds)
    options = {} if threshold is None else {"sparse_threshold": threshold}  # None: the default
    sparse = sample(apply(trained, **options), *conds)
    # a dropped pixel moves by at most threshold x its expert difference per layer; through 8
    # layers and 3 steps the latent stays within 5 % of the effect MoA has at all, the change one
    # strength step (0.05) makes
    assert (sparse - dense).abs().max() <= 0.05 * (dense - base).abs().max()
    if threshold is not None:
        assert not torch.equal(sparse, dense)  # some pixels were skipped


def test_training_forwards_run_the_personal_expert_on_every_pixel(base_model, conds, apply, trained):
    modules = attention_modules(base_model.model.diffusion_model)
    queries = {path: [] for path in modules}
    handles = [
        attn.to_out.register_forward_hook(lambda m, a, o, path=path: queries[path].append(a[0].shape[1]))
        for path, attn in modules.items()
    ]
    patched = apply(trained, region=torch.zeros(8, 8)).clone()  # inference would skip every pixel
    probe = TrainingProbe()
    patched.model_options["transformer_options"][PROBE_KEY] = probe
    try:
        sample(patched, *conds, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    for path, counts in queries.items():
        assert len(counts) == 2 and counts[0] == counts[1], path  # prior, then personal on every pixel
    assert len(probe.router) == 8


@both_families
def test_fused_personal_attention_matches_the_host_kernel_and_moa_init_stays_exact(
    base_model, conds, apply, trained, monkeypatch
):
    from comfyui_moa.moa_core import RouterMode
    from comfyui_moa.nodes.host import patch
    from moa_testing.tiny import moa_weights_for

    def runtime(model):
        return model.model_options["transformer_options"]["patches"]["attn1_output_patch"][0].runtime

    fused = apply(trained, sparse_threshold=0.0)
    assert runtime(fused).fused_attention  # the CPU host's default kernel materialises the scores
    monkeypatch.setattr(patch, "_MATERIALISING", ())  # the personal expert on ComfyUI's own kernel
    host_kernel = apply(trained, sparse_threshold=0.0)
    assert not runtime(host_kernel).fused_attention
    fused_out, host_out, base = sample(fused, *conds), sample(host_kernel, *conds), sample(base_model, *conds)
    torch.testing.assert_close(fused_out, host_out, rtol=1e-5, atol=1e-4)  # float32 rounding at most
    assert (fused_out - base).abs().max() > 1e-2
    monkeypatch.undo()
    untrained = apply(moa_weights_for(base_model), router_mode=RouterMode.PERSONAL, sparse_threshold=0.0)
    assert torch.equal(sample(untrained, *conds), base)


@both_families
def test_the_gpu_strategy_gives_the_cpu_strategys_mixture(base_model, conds, apply, trained, monkeypatch):
    """Where launching work costs more than doing it, the threshold zeroes w in place and q/k/v are
    not merged: fewer operations, the same result (here forced on the CPU)."""
    from comfyui_moa.nodes.host import patch

    def runtime(model):
        return model.model_options["transformer_options"]["patches"]["attn1_output_patch"][0].runtime

    assert patch._compute_bound(torch.device("cpu")) and not patch._compute_bound(torch.device("cuda", 0))
    region = centred_square(64)
    cpu = apply(trained, region=region)
    assert runtime(cpu).mixing.gather and all(p.q_weight and p.k_weight for p in runtime(cpu).prior)
    monkeypatch.setattr(patch, "_compute_bound", lambda device: False)
    gpu = apply(trained, region=region)
    assert not runtime(gpu).mixing.gather and not any(p.q_weight or p.k_weight for p in runtime(gpu).prior)
    base, cpu_out, gpu_out = sample(base_model, *conds), sample(cpu, *conds), sample(gpu, *conds)
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-5, atol=1e-4)
    assert (cpu_out - base).abs().max() > 1e-2


@pytest.mark.parametrize(("sampler", "embedded"), [("euler", [4]), ("dpm_2", [4, 1, 1])])
def test_a_sampling_run_embeds_the_timesteps_of_its_whole_schedule_once(
    base_model, conds, apply, trained, monkeypatch, sampler, embedded
):
    """The GPU strategy keeps per sampling run what no model call changes (the subject tokens' layout,
    the fuser's fixed inputs and matrices) and the fuser's time embedding of every sigma of the
    schedule, computed at the run's first call (3 steps: 4 sigmas). A sampler that also calls the
    model between the schedule's sigmas (dpm_2: two midpoints) gets those embedded per call. The
    samples are the CPU strategy's either way (here forced on the CPU)."""
    from comfyui_moa.nodes.host import patch

    cpu = sample(apply(trained), *conds, sampler=sampler)
    monkeypatch.setattr(patch, "_compute_bound", lambda device: False)
    counts, embed = [], type(trained.fuser).time_embedding

    def counted(fuser, timestep, like_tensor):
        counts.append(timestep.numel())
        return embed(fuser, timestep, like_tensor)

    monkeypatch.setattr(type(trained.fuser), "time_embedding", counted)
    gpu = sample(apply(trained), *conds, sampler=sampler)
    assert counts == embedded
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-4)
    assert (cpu - sample(base_model, *conds, sampler=sampler)).abs().max() > 1e-2


@pytest.mark.parametrize("new_context_per_layer", [False, True])
def test_merged_projections_follow_a_context_another_pack_changes(
    base_model, conds, apply, trained, monkeypatch, new_context_per_layer
):
    """The GPU strategy batches the cross-attention layers' personal keys and values for the call's
    context; a layer whose context another pack replaced builds its own (here forced on the CPU)."""
    from comfyui_moa.nodes.host import patch

    def scaled_context(n, context, value, extra_options):
        if new_context_per_layer:
            context = context * (1.0 + 0.1 * extra_options["block"][1])  # a new tensor for every layer
        return n, context, context

    model = base_model.clone()
    model.set_model_attn2_patch(scaled_context)
    cpu = sample(apply(trained, model=model), *conds)
    monkeypatch.setattr(patch, "_compute_bound", lambda device: False)
    gpu = sample(apply(trained, model=model), *conds)
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-4)
    assert (gpu - sample(model, *conds)).abs().max() > 1e-2


def test_the_cpu_reads_a_projection_weight_only_where_its_forward_uses_that_very_tensor():
    import comfy.ops

    from comfyui_moa.moa_core.mixture import called_weight
    from comfyui_moa.nodes.host.patch import _weight_of

    linear = comfy.ops.disable_weight_init.Linear(8, 4, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(2, 10, 8)

    def weight(module=linear, x=x):
        return _weight_of(module, called_weight(module), x)

    assert weight() is linear.weight  # the forward multiplies by it as it is
    linear.weight_function = [lambda w: 2.0 * w]  # e.g. a LoRA applied at op time (low VRAM)
    assert torch.equal(weight(), 2.0 * linear.weight)
    torch.testing.assert_close(x @ weight().t(), linear(x))
    linear.weight_function = []
    handle = linear.register_forward_hook(lambda module, args, out: 3.0 * out)
    assert torch.equal(weight(), 3.0 * linear.weight)
    handle.remove()
    assert weight(x=x[:1, :3]) is linear.weight  # read: free for any number of rows
    linear.comfy_cast_weights = True  # casts to the input on use: built by calling it
    assert torch.equal(weight(x=x.double()), linear.weight.double())
    assert weight(x=x[:1, :3]) is None  # too few rows for the call on the identity to pay


def test_the_fuser_runs_once_per_model_call_for_every_cross_attention_layer(conds, apply, trained):
    calls = []
    handle = trained.fuser.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        sample(apply(trained), *conds, steps=2)
    finally:
        handle.remove()
    assert calls == [len(trained.config.cross_layers)] * 2  # two steps, each one model call (cond + uncond)


def test_zero_deltas_skip_the_personal_expert_unless_the_weights_are_being_trained(base_model, conds, apply):
    from comfyui_moa.moa_core import RouterMode
    from moa_testing.tiny import moa_weights_for

    modules = attention_modules(base_model.model.diffusion_model)
    calls = {path: 0 for path in modules}
    handles = [
        attn.to_out.register_forward_hook(lambda m, a, o, path=path: calls.__setitem__(path, calls[path] + 1))
        for path, attn in modules.items()
    ]
    untrained = moa_weights_for(base_model)
    try:
        for weights_fixed, personal_calls in ((True, 0), (False, 1)):
            calls.update(dict.fromkeys(calls, 0))
            model = apply(untrained, router_mode=RouterMode.PERSONAL, weights_fixed=weights_fixed)
            out = sample(model, *conds, steps=1)
            assert set(calls.values()) == {1 + personal_calls}, weights_fixed  # the prior, then the personal
            torch.testing.assert_close(out, sample(base_model, *conds, steps=1), rtol=1e-5, atol=1e-4)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"sparse_threshold": 1.0}, "sparse_threshold"),
        ({"sparse_threshold": -0.1}, "sparse_threshold"),
        ({"personal_rows": "uncond"}, "personal_rows"),
        ({"strength": -1.0}, "strength"),
        ({"region": torch.full((8, 8), 2.0)}, "region"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_field(options, field):
    with pytest.raises(OptionsError, match=f"^{field}: "):
        MoAOptions(**options)


def test_the_default_options_run_the_sparse_mixture_on_every_row():
    options = MoAOptions()
    assert options.personal_rows == "all" and 0.0 < options.sparse_threshold <= 0.01


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_BENCHMARKS))
    import bench_sampling

    return bench_sampling


def test_benchmark_modes_parse_into_options(bench):
    mode = bench.parse_mode("r64+cond+sparse=0.1")
    assert (mode.rank, mode.options) == (64, {"sparse_threshold": 0.1, "personal_rows": "cond"})
    assert bench.parse_mode("default").options == {}
    assert bench.parse_mode("base").rank is None
    with pytest.raises(SystemExit, match="unknown token"):
        bench.parse_mode("fast")


def test_benchmark_prints_a_ratio_for_every_mode(bench, capsys):
    modes = bench.DEFAULT_MODES.split(",")
    assert bench.main(["--model", "tiny", "--sizes", "64", "--rounds", "1", "--modes", ",".join(modes)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines() if line.startswith("| 64 |")}
    assert [name.removesuffix(" (default)") for name in rows] == modes
    assert any(name.endswith("(default)") for name in rows)
    for name, cells in rows.items():
        assert float(cells[4]) > 0, name  # MoA/base
        assert float(cells[6]) > 0, name  # fastest / fastest base
        if name != "base":
            assert cells[7].strip().endswith("%"), name  # kept pixels
    assert float(rows["dense"][8]) == 0.0  # its own deviation
    assert "load_weights" in out and "subject encode" in out and "router maps" in out


def test_the_benchmark_background_stands_in_for_a_less_decisive_router(bench, capsys):
    kept = {}
    for background in ("0", "0.05"):
        argv = ["--model", "tiny", "--sizes", "64", "--rounds", "1", "--modes", "base,default"]
        assert bench.main([*argv, "--background", background]) == 0
        (row,) = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 | default")]
        kept[background] = float(row[7].strip().removesuffix("%"))
    # off the square w is 0 (the prior, skipped), or up to 0.05 and mostly above the 0.01 threshold
    assert kept["0"] == pytest.approx(25.0, abs=0.5) and kept["0.05"] > 50.0


def test_the_operation_count_shows_the_gpu_path_merging_once_per_run(monkeypatch, capsys):
    """count_ops on the tiny UNet: the GPU path's default stays under the 1.42x it took before a
    sampling run kept its subject layout, fuser inputs and time embeddings (1.30x on v0.3.64: 8 layers,
    so the per-call fuser and keys and values weigh more than among SD1.5's 32; 2.2x before the
    projections were merged per run), its first call carries the merge, and the CPU path builds
    nothing per run."""
    import comfy.cli_args

    monkeypatch.syspath_prepend(str(REPO_BENCHMARKS))
    import count_ops

    flag = "use_pytorch_cross_attention"  # count_ops sets it (the GPUs' kernel): restored after the test
    monkeypatch.setattr(comfy.cli_args.args, flag, getattr(comfy.cli_args.args, flag))

    assert count_ops.main(["--model", "tiny", "--size", "64", "--modes", "base,dense,default"]) == 0
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| gpu") or line.startswith("| cpu")
    }
    gpu, cpu = rows[("gpu", "default")], rows[("cpu", "default")]
    assert float(gpu[4]) < 1.35 and float(gpu[4]) < float(cpu[4])
    assert int(gpu[6]) > 0 and int(cpu[6]) == 0  # the first call's extra operations: the merge
