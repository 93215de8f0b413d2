"""Tier 2: the patch fires where it should and lives beside everything else a graph may hold."""

import collections

import comfy.model_management
import comfy.samplers
import comfy.sd
import pytest
import torch
from comfy.ldm.modules.attention import optimized_attention

from comfyui_moa.moa_core import MoAError, PersonalPrompt, RouterMode, WeightsMismatchError
from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa
from comfyui_moa.nodes.host.unet_layers import attention_modules, layer_specs
from moa_testing.tiny import FAMILIES, moa_weights_for, model_patcher, sample, text_cond, tiny_controlnet

both_families = pytest.mark.parametrize("family", FAMILIES)

STEPS = 3


class CallLog:
    """Forward hooks on host modules: the batch size of every call, per module path."""

    def __init__(self, modules: dict):
        self.calls = {path: [] for path in modules}
        self.inputs = {path: [] for path in modules}
        self._handles = [m.register_forward_hook(self._hook(path)) for path, m in modules.items()]

    def _hook(self, path):
        def hook(module, args, output):
            self.calls[path].append(args[0].shape[0])
            self.inputs[path].append(args[0].detach().clone())

        return hook

    def close(self):
        for handle in self._handles:
            handle.remove()


@both_families
@pytest.mark.parametrize(("personal_rows", "personal_batch"), [("all", 2), ("cond", 1)])
def test_every_layer_runs_both_experts_at_every_step(
    family, base_model, conds, apply, trained, personal_rows, personal_batch
):
    modules = attention_modules(base_model.model.diffusion_model)
    # to_out: the personal q/k/v may be one matmul with a merged weight; the output projection
    # always runs on the expert's attention output
    log = CallLog({path: attn.to_out for path, attn in modules.items()})
    try:
        # dense: with a sparse threshold, layers where no pixel passes it skip the personal expert
        sample(apply(trained, personal_rows=personal_rows, sparse_threshold=0.0), *conds, steps=STEPS)
    finally:
        log.close()
    assert len(modules) == {"sd15": 8, "sdxl": 22}[family]
    for path, batches in log.calls.items():
        # per step: the prior on cond + uncond (batch 2), then the personal expert
        assert batches == [2, personal_batch] * STEPS, path


REPLACE_CALLS = collections.Counter()  # module-level: clone() deep-copies the replace object


class IPAdapterStyleReplace:
    """What IPAdapter-like packs put in the attn2 replace slot: attention plus attention to extra tokens."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = {dim: torch.randn(1, 4, dim, generator=generator) for dim in (32, 64, 128)}
        self.name = f"ipadapter-{seed}"

    @property
    def calls(self) -> int:
        return REPLACE_CALLS[self.name]

    def __call__(self, q, k, v, extra_options):
        REPLACE_CALLS[self.name] += 1
        heads = extra_options["n_heads"]
        extra = self.tokens[q.shape[-1]].expand(q.shape[0], -1, -1)
        return optimized_attention(q, k, v, heads) + 0.5 * optimized_attention(q, extra, extra, heads)


def with_ipadapter(model, replace):
    patched = model.clone()
    for path in attention_modules(model.model.diffusion_model):
        if path.endswith("attn2"):
            name, block_id, index = layer_block(path)
            patched.set_model_attn2_replace(replace, name, block_id, index)
    return patched


def layer_block(path):
    from comfyui_moa.moa_core import block_key

    return block_key(path.rsplit(".", 1)[0])


@both_families
@pytest.mark.parametrize("moa_first", [False, True])
def test_attn2_replace_of_another_pack_still_runs_and_stays_in_the_output(base_model, conds, trained, moa_first):
    def build(weights, router_mode=RouterMode.LEARNED, ipadapter=None):
        options = MoAOptions(router_mode=router_mode)
        if ipadapter is None:
            return apply_moa(base_model, model_patcher(weights), one_prompt(), options)
        if moa_first:
            return with_ipadapter(apply_moa(base_model, model_patcher(weights), one_prompt(), options), ipadapter)
        return apply_moa(with_ipadapter(base_model, ipadapter), model_patcher(weights), one_prompt(), options)

    replace = IPAdapterStyleReplace(seed=5)
    REPLACE_CALLS.clear()
    both = sample(build(trained, ipadapter=replace), *conds, steps=STEPS)
    cross = sum(path.endswith("attn2") for path in attention_modules(base_model.model.diffusion_model))
    assert replace.calls == STEPS * cross  # every cross-attention block, every step (cond+uncond batched)
    moa_only = sample(build(trained), *conds, steps=STEPS)
    assert (both - moa_only).abs().max() > 1e-4, "the other pack's attention had no effect beside MoA"
    ipadapter_only = sample(with_ipadapter(base_model, replace), *conds, steps=STEPS)
    prior_only = sample(build(trained, RouterMode.PRIOR, replace), *conds, steps=STEPS)
    assert torch.equal(prior_only, ipadapter_only)


def one_prompt():
    embeds = torch.randn(1, 768, generator=torch.Generator().manual_seed(3))
    return PersonalPrompt.single(77, [5], [0], embeds)


@both_families
def test_controlnet_in_the_same_run_still_works(base_model, conds, apply, trained):
    controlnet = tiny_controlnet(base_model)
    hint = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    control = controlnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    positive, negative = conds
    controlled = [[positive[0][0], {**positive[0][1], "control": control, "control_apply_to_uncond": False}]]

    base_cn = sample(base_model, controlled, negative)
    assert (base_cn - sample(base_model, positive, negative)).abs().max() > 1e-4, "the test ControlNet does nothing"
    moa_cn = sample(apply(trained), controlled, negative)
    assert (moa_cn - sample(apply(trained), positive, negative)).abs().max() > 1e-4, "ControlNet has no effect with MoA"
    assert (moa_cn - base_cn).abs().max() > 1e-4, "MoA has no effect with ControlNet"
    assert torch.equal(sample(apply(trained, router_mode=RouterMode.PRIOR), controlled, negative), base_cn)


def lora_on_attention(model, seed: int):
    """A kohya-format LoRA on every attention projection of the model, loaded by ComfyUI's loader."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for path, attn in attention_modules(model.model.diffusion_model).items():
        for name in ("to_q", "to_k", "to_v"):
            linear = getattr(attn, name)
            key = f"lora_unet_{path.replace('.', '_')}_{name}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=generator) * 0.3
            lora[f"{key}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=generator) * 0.3
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    return patched


@both_families
def test_lora_on_the_model_reaches_both_experts(base_model, conds, trained):
    lora_model = lora_on_attention(base_model, seed=9)
    base_lora = sample(lora_model, *conds)
    assert (base_lora - sample(base_model, *conds)).abs().max() > 1e-4, "the test LoRA does nothing"

    def moa_on(model, weights, router_mode, weights_fixed=True):
        options = MoAOptions(router_mode=router_mode)
        return apply_moa(model, model_patcher(weights), one_prompt(), options, weights_fixed=weights_fixed)

    # the personal expert is the model's own (LoRA-patched) projection plus a zero delta: the prior,
    # computed again (weights_fixed=False runs it) on the fused kernel, or skipped as known equal
    untrained = moa_weights_for(base_model)
    personal = sample(moa_on(lora_model, untrained, RouterMode.PERSONAL, weights_fixed=False), *conds)
    torch.testing.assert_close(personal, base_lora, rtol=1e-5, atol=1e-4)  # float rounding
    base = sample(base_model, *conds)
    assert (personal - base).abs().max() > 100 * (personal - base_lora).abs().max()  # the LoRA is in it
    assert torch.equal(sample(moa_on(lora_model, untrained, RouterMode.PERSONAL), *conds), base_lora)
    assert torch.equal(sample(moa_on(lora_model, trained, RouterMode.PRIOR), *conds), base_lora)
    # and it does not matter whether the LoRA is loaded before or after MoA
    lora_then_moa = sample(moa_on(lora_model, trained, RouterMode.LEARNED), *conds)
    moa_then_lora = sample(lora_on_attention(moa_on(base_model, trained, RouterMode.LEARNED), seed=9), *conds)
    assert torch.equal(lora_then_moa, moa_then_lora)


@both_families
def test_merged_projections_carry_the_lora_and_are_built_once_per_sampling_run(base_model, conds, trained, monkeypatch):
    """The GPU strategy sums each layer's host projection (called, so the LoRA is in it) and delta
    once per run: the host's q projections run once more per run, not once more per step."""
    from comfyui_moa.nodes.host import patch

    lora_model = lora_on_attention(base_model, seed=9)
    read = sample(apply_moa(lora_model, model_patcher(trained), one_prompt()), *conds, steps=3)
    monkeypatch.setattr(patch, "_compute_bound", lambda device: False)
    merging = apply_moa(lora_model, model_patcher(trained), one_prompt())
    modules = attention_modules(lora_model.model.diffusion_model)
    calls = collections.Counter()
    handles = [m.to_q.register_forward_hook(lambda *a, p=p: calls.update([p])) for p, m in modules.items()]
    try:
        merged = sample(merging, *conds, steps=3)
        once = dict(calls)
        sample(merging, *conds, steps=3)
    finally:
        for handle in handles:
            handle.remove()
    assert set(once.values()) == {3 + 1}  # the prior in each step, the merge once
    assert dict(calls) == {p: 2 * n for p, n in once.items()}  # a new run merges again
    torch.testing.assert_close(merged, read, rtol=1e-5, atol=1e-4)
    without_lora = sample(apply_moa(base_model, model_patcher(trained), one_prompt()), *conds, steps=3)
    assert (merged - without_lora).abs().max() > 100 * (merged - read).abs().max()


def test_clone_shares_patch_objects_and_weights(apply, trained):
    patched = apply(trained)
    clone = patched.clone().clone()
    for name in ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch"):
        ours = patched.model_options["transformer_options"]["patches"][name]
        theirs = clone.model_options["transformer_options"]["patches"][name]
        assert len(theirs) == 1 and theirs[0] is ours[0], name
    output_patch = clone.model_options["transformer_options"]["patches"]["attn2_output_patch"][0]
    assert output_patch.runtime.weights is trained
    assert output_patch.to(torch.device("cpu")) is output_patch


def test_moa_weights_are_loaded_by_model_management_with_the_unet(conds, apply, trained):
    patched = apply(trained)
    (weights_patcher,) = patched.model_options["transformer_options"]["patches"]["attn2_output_patch"][0].models()
    assert weights_patcher.model is trained
    comfy.model_management.unload_all_models()
    sample(patched, *conds, steps=1)
    loaded = [m.model for m in comfy.model_management.current_loaded_models]
    assert any(m is weights_patcher for m in loaded)


def test_half_precision_weights_run_on_a_float32_model(base_model, conds, apply, trained):
    full = sample(apply(trained), *conds)
    half = moa_weights_for(base_model, seed=7).half()
    out = sample(apply(half), *conds)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, full, atol=5e-3, rtol=0)  # fp16 rounding of the weights only


def test_router_record_starts_over_with_each_sampling_run(base_model, conds, apply, trained):
    patched, record = apply(trained, record=True)
    sample(patched, *conds, steps=3)
    assert record.runs == 1 and record.steps() == [0, 1, 2]
    assert record.layers() == list(range(8))
    sample(patched, *conds, steps=2)
    assert record.runs == 2 and record.steps() == [0, 1]
    sigmas = comfy.samplers.calculate_sigmas(base_model.get_model_object("model_sampling"), "normal", 2)
    torch.testing.assert_close(torch.tensor(record.sigmas), sigmas.float(), atol=1e-5, rtol=0)
    assert record.get(0, 0).shape == (1, 32, 32) and record.get(0, 2).shape == (1, 16, 16)


def test_subjects_are_fused_into_their_words_over_77_tokens_and_in_batches(base_model, trained):
    """Two subjects on tokens 5 and 100 of a 154-token prompt, batch 2: the personal cross-attention
    context differs from the prior's exactly at those tokens of the cond rows, by the fused tokens."""
    embeds = torch.randn(2, 768, generator=torch.Generator().manual_seed(3))
    prompt = PersonalPrompt.single(154, [5, 100], [0, 1], embeds)
    positive, negative = text_cond(1, tokens=154), text_cond(2, tokens=77)
    patched = apply_moa(base_model, model_patcher(trained), prompt).clone()
    chunk_kinds = []  # ComfyUI's order of the cond (0) and uncond (1) chunks in the batch

    def observe(n, context, value, extra_options):
        chunk_kinds.append(list(extra_options["cond_or_uncond"]))
        return n, context, value

    patched.set_model_attn2_patch(observe)
    modules = attention_modules(base_model.model.diffusion_model)
    cross = {path: attn.to_k for path, attn in modules.items() if path.endswith("attn2")}
    log = CallLog(cross)
    try:
        sample(patched, positive, negative, steps=1, batch=2)
    finally:
        log.close()

    sampling = base_model.get_model_object("model_sampling")
    timestep = sampling.timestep(comfy.samplers.calculate_sigmas(sampling, "normal", 1)[:1])
    assert chunk_kinds[0] in ([0, 1], [1, 0])
    cond_rows = torch.tensor([0, 1]) if chunk_kinds[0] == [0, 1] else torch.tensor([2, 3])
    for path, (prior_ctx, personal_ctx) in ((p, log.inputs[p]) for p in cross):
        assert prior_ctx.shape == personal_ctx.shape == (4, 154, 768)
        changed = (prior_ctx != personal_ctx).any(dim=-1).nonzero().tolist()
        assert changed == [[row, token] for row in cond_rows.tolist() for token in (5, 100)], path
        layer_id = trained.cross_index[trained.paths.index(path)]
        words = prior_ctx[cond_rows][:, [5, 100]]
        expected = trained.fuser(words, embeds, timestep, layer_id)
        torch.testing.assert_close(personal_ctx[cond_rows][:, [5, 100]], expected, atol=1e-5, rtol=1e-5)


def test_applying_moa_twice_is_refused_and_changes_nothing(base_model, apply, trained):
    patched = apply(trained)
    before = {k: list(v) for k, v in patched.model_options["transformer_options"]["patches"].items()}
    with pytest.raises(MoAError, match="already has MoA applied"):
        apply(trained, model=patched)
    after = patched.model_options["transformer_options"]["patches"]
    assert {k: list(v) for k, v in after.items()} == before


def test_weights_made_for_another_architecture_are_refused_before_cloning(base_model, apply):
    import comfy.supported_models

    from moa_testing.tiny import TINY_SD15

    config = comfy.supported_models.SD15({**TINY_SD15, "model_channels": 64})
    config.set_inference_dtype(torch.float32, None)
    other = moa_weights_for(model_patcher(config.get_model({}, device="meta")))
    with pytest.raises(WeightsMismatchError, match="moa_weights: the MoA weights were made for a model with other"):
        apply(other)
    assert "patches" not in base_model.model_options.get("transformer_options", {})


@pytest.mark.parametrize(("weights_family", "model_family"), [("sd15", "sdxl"), ("sdxl", "sd15")])
def test_weights_of_the_other_family_are_refused_by_name(apply, weights_family, model_family):
    from moa_testing.tiny import tiny_model

    weights = moa_weights_for(tiny_model(weights_family), seed=7)
    model = tiny_model(model_family)
    with pytest.raises(
        WeightsMismatchError, match=f"are for {weights_family} models but the model is {model_family}; load MoA"
    ):
        apply(weights, model=model)
    assert "patches" not in model.model_options.get("transformer_options", {})


@both_families
def test_layer_tables_match_the_full_models(family):
    from comfyui_moa.moa_core import FAMILY_BLOCKS, family_layer_paths
    from moa_testing.tiny import full_model_on_meta

    model = full_model_on_meta(family)
    specs = layer_specs(model.model.diffusion_model)
    assert [spec.path for spec in specs] == family_layer_paths(family)
    assert len(specs) == 2 * len(FAMILY_BLOCKS[family]) == {"sd15": 32, "sdxl": 140}[family]
