"""The MoA patch: list hooks and wrappers on a model clone, nothing replaced, nothing monkeypatched.

Per model call, an APPLY_MODEL wrapper decides once whether MoA is active at this sigma and
which batch rows are cond rows, and passes that plan down in `transformer_options`. In every
transformer block, the attn1/attn2 input patches keep the attention's input; the output patches
(which see the prior's output, with whatever ComfyUI and other packs put into it) run the personal
expert and the router, and mix. An OUTER_SAMPLE wrapper starts a new router record per run.

Patch objects are immutable and shared: clones (deep-copied or not) get the same objects and the
same weights, and per-call state lives in `extra_options`.

Cheaper modes are MoAOptions fields, resolved here once (the maths is moa_core.mixture's):
personal_rows="cond" (uncond rows keep the prior), sparse_threshold (the personal expert runs
only where w = r1 * strength * region passes it; the default), region (a mask scaling w). Layers
whose deltas are zero skip the personal expert (it is the prior there), and where ComfyUI's
attention builds the whole score matrix the personal expert runs fused SDPA (_MATERIALISING).
On a GPU, where Python launching work is the bottleneck at SD1.5 sizes, the same mixture takes
fewer operations (_compute_bound): each sampling run merges every layer's personal projections
once (moa_core.merged; the host modules are called on the identity, so LoRA, casting and weight
streaming apply as in any call; MergedRun, in the run's transformer_options, leaves with the
run) and keeps what no model call changes (the subject tokens' layout, the fuser's fixed inputs,
the time embeddings of the run's schedule), and each model call runs the fuser's MLP once for all
layers. On the CPU the personal q/k/v are one matmul each with the host's weight plus the delta:
the weight is read only where the module's own forward would use that very tensor (_weight_of);
every other host module is called.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import comfy.ldm.modules.attention as host_attention
import comfy.ops
import torch
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import WrappersMP

from ...moa_core import (
    Fuser,
    MoAError,
    MoAWeights,
    PersonalPrompt,
    PriorProjections,
    RouterMode,
    RouterRecord,
    SubjectTokens,
    TrainingProbe,
    fuse_subjects,
    moa_attention,
    personal_context,
    subject_attention,
    subject_tokens,
)
from ...moa_core.attention_router import AttentionRouterConfig, RouterRun, subject_probabilities, union
from ...moa_core.errors import OptionsError
from ...moa_core.helpers import seq_to_hw
from ...moa_core.merged import (
    CrossStack,
    HostWeights,
    KeysValues,
    MergedFuser,
    MergedLayer,
    cross_stack,
    merge_fuser,
    merge_layer,
    merged_moa_attention,
    personal_keys_values,
)
from ...moa_core.mixture import Mixing, WeightOf, called_weight
from ...moa_core.prompt import subject_words
from ...moa_core.region import check_region, region_at, region_levels
from .attention_router import begin_run, keep_for_run, layer_masks, read_level, read_pixels, run_of
from .unet_layers import attention_modules, check_weights_fit

STEP_KEY = "moa_step"
PROMPT_KEY = "moa_prompt"  # transformer_options: a PersonalPrompt for this call (training batches)
PROBE_KEY = "moa_probe"  # transformer_options: a TrainingProbe to fill during this call
MERGED_KEY = "moa_merged"  # transformer_options of one sampling run: its MergedRun
WRAPPER_KEY = "comfyui_moa"
PERSONAL_ROWS = ("all", "cond")
DEFAULT_SPARSE_THRESHOLD = 0.01
"""Pixels whose personal weight w = r1 * strength * region is at most this keep the prior without
running the personal expert. Per layer such a pixel moves by at most 1 % of |personal - prior|
from the dense output. Bound for the default: the sampled latent moves from dense MoA's by less
than one step (0.05) of the strength slider moves it, relative to dense-vs-base. Measured at
512 px (benchmarks/bench_sampling.py): 0.0003 against 0.049 on the CPU (fp32), 0.054 against
0.082 on an H100 (fp16); a threshold of 0.05 gives 0.11 and misses it."""
_MATERIALISING = tuple(
    getattr(host_attention, name) for name in ("attention_sub_quad", "attention_split", "attention_basic")
    if hasattr(host_attention, name)
)  # fmt: skip
"""ComfyUI backends that build the score matrix in memory (the CPU default is sub_quad). With one
of these the personal expert runs ComfyUI's attention_pytorch (torch's fused SDPA) instead: 1.85x
faster on the gathered queries at 64x64 px on a 2-core CPU, no 1 GiB score matrix, and the same
result to float rounding (1e-7). Any other backend (SDPA, xformers, sage, an override a node set)
is the user's pick and runs the personal expert too."""


@dataclass(frozen=True)
class MoAOptions:
    strength: float = 1.0  # scales the router's personal weight
    start_percent: float = 0.0  # MoA acts from this point of the schedule ...
    end_percent: float = 1.0  # ... to this one; outside, every layer is exactly the prior
    router_mode: RouterMode = RouterMode.LEARNED
    personal_rows: str = "all"  # "all" rows, or "cond": uncond rows keep the prior
    sparse_threshold: float = DEFAULT_SPARSE_THRESHOLD  # 0: the personal expert runs at every pixel
    region: torch.Tensor | None = field(default=None, compare=False)  # [H, W] in [0, 1], scales r1
    attention_router: AttentionRouterConfig = field(default_factory=AttentionRouterConfig)  # RouterMode.ATTENTION

    def __post_init__(self) -> None:
        if self.personal_rows not in PERSONAL_ROWS:
            raise OptionsError(
                f"personal_rows: {self.personal_rows!r} is not one of {PERSONAL_ROWS}; pick 'all' (faithful) "
                "or 'cond' (uncond rows keep the prior: faster, changes what CFG amplifies)"
            )
        if not 0.0 <= self.sparse_threshold < 1.0:
            raise OptionsError(
                f"sparse_threshold: {self.sparse_threshold} is outside [0, 1); use 0 for the dense mixture or a "
                f"small value such as {DEFAULT_SPARSE_THRESHOLD}"
            )
        if not self.strength >= 0.0:
            raise OptionsError(f"strength: {self.strength} is negative; use 0 (plain model) to 1 (full MoA)")
        if self.region is not None:
            object.__setattr__(self, "region", check_region(self.region, "region"))

    def mixing(self, gather: bool) -> Mixing:
        return Mixing(self.strength, self.router_mode, self.sparse_threshold, gather)


@dataclass(frozen=True)
class MoAStep:
    """What one model call needs, decided once per call rather than in every layer."""

    rows: torch.Tensor | None  # batch rows the personal expert runs on; None: all
    record_rows: torch.Tensor  # rows of r1 that are cond rows
    tokens: SubjectTokens  # the subject tokens of the cond rows
    step: int | None  # sampling step, when recording
    regions: dict[int, torch.Tensor] | None  # pixel count of a level -> region [n, 1] there
    fused: dict = field(default_factory=dict, compare=False, repr=False)
    """id(context) -> (context, its fuse_subjects): filled by the first cross-attention layer
    that reads a context; the others (usually every one) reuse it."""
    reading: "AttentionReading | None" = None  # RouterMode.ATTENTION: where r1 comes from
    merged: "MergedRun | None" = field(default=None, compare=False, repr=False)
    """This sampling run's merged layers; None where projections are not merged (the CPU,
    training, a model called outside a sampler)."""
    keys_values: dict = field(default_factory=dict, compare=False, repr=False)  # id(context) -> (context, by layer)
    fuser: MergedFuser | None = field(default=None, compare=False, repr=False)  # the run's, with merged
    time: torch.Tensor | None = field(default=None, compare=False, repr=False)  # its time embedding [cond]

    def personal_keys_values(
        self, context: torch.Tensor, layer_index: int, runtime: "MoARuntime", x: torch.Tensor
    ) -> KeysValues | None:
        """Layer `layer_index`'s personal keys and values for `context`: every merged
        cross-attention layer's at the first such call (moa_core.merged.personal_keys_values). None
        for a context other than the call's first (another pack gave this layer its own): the
        layer then builds its personal context itself."""
        hit = self.keys_values.get(id(context))
        if hit is None or hit[0] is not context:
            if self.keys_values:
                return None
            subjects = self.fused_subjects(context, runtime.weights.fuser)
            values = personal_keys_values(context, self.tokens, subjects, self.merged.cross_stack(runtime, x))
            hit = self.keys_values[id(context)] = (context, values)
        return hit[1].get(layer_index)

    def fused_subjects(self, context: torch.Tensor, fuser: Fuser) -> torch.Tensor:
        hit = self.fused.get(id(context))
        if hit is None or hit[0] is not context:
            if self.fuser is None:
                fused = fuse_subjects(context, self.tokens, fuser)
            else:
                words = subject_words(context, self.tokens)
                fused = self.fuser(words, self.time) if len(words) else words[None]
            hit = self.fused[id(context)] = (context, fused)
        return hit[1]


@dataclass(frozen=True)
class AttentionReading:
    """RouterMode.ATTENTION in one model call: r1 is the union of the subjects' attention masks."""

    run: RouterRun  # this sampling run's maps (not the patch's: clones share patch objects)
    acting: bool  # past the warm-up; before it every layer is the prior
    read_pixels: int  # pixel count of the layers whose cross-attention is read
    cond_rows: torch.Tensor  # long [b]
    latent_of_row: torch.Tensor  # long [B]: the latent (cond row index) each row belongs to
    columns: list  # per subject: long [c] its token columns in the context
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # layer_masks' cache

    def r1(self, runtime: "MoARuntime", pixels: int, hw: tuple[int, int]) -> torch.Tensor | None:
        """r1 [B, n, 1] at a layer of `pixels`; None while the router does not act (the prior)."""
        if not self.acting:
            return None
        masks = layer_masks(self.run, self.masks, pixels, hw, runtime.options.attention_router)
        return None if masks is None else union(masks)[self.latent_of_row][..., None]


@dataclass(frozen=True)
class MoARuntime:
    """Everything the patch objects share: weights, the host's projections, options."""

    weights: MoAWeights
    weights_patcher: ModelPatcher
    prior: tuple[PriorProjections, ...]  # per MoA layer
    attn1_layers: dict  # block key -> index of its attn1 MoA layer
    attn2_layers: dict
    prompt: PersonalPrompt
    options: MoAOptions
    mixing: Mixing  # the options' mixing, resolved once
    training_mixing: Mixing  # the same without sparsity: training forwards read every pixel
    sigma_start: float
    sigma_end: float
    fused_attention: bool  # the personal expert runs attention_pytorch; see _MATERIALISING
    same_as_prior: frozenset[int]  # MoA layers whose deltas are zero (personal expert == prior)
    record: RouterRecord | None = None
    read_level: int = 2  # RouterMode.ATTENTION: the UNet level it reads (2: 16x16 at 512 px)
    sigma_warm: float = 0.0  # RouterMode.ATTENTION acts at sigmas at or below this
    merge_per_run: frozenset[int] = frozenset()  # MoA layers run with merged projections (moa_core.merged)
    heads: tuple[int, ...] = ()  # each MoA layer's head count

    def plan_step(
        self,
        x: torch.Tensor,
        dtype: torch.dtype,
        sigmas: torch.Tensor,
        timestep_of: Callable[[torch.Tensor], torch.Tensor],
        context: torch.Tensor,
        transformer_options: dict,
    ) -> MoAStep | None:
        """The plan of one model call on latents x at `sigmas` [b] (`dtype`: the diffusion model's
        input dtype; `timestep_of`: the model's timesteps of sigmas, asked for only where the
        sampling run has not computed them)."""
        if self.options.strength == 0.0:
            return None
        sigma = None
        if transformer_options.get("sigmas") is not None:
            sigma = _first(transformer_options["sigmas"])  # the one host sync of a model call
            if not self.sigma_end <= sigma <= self.sigma_start:
                return None
        chunks = transformer_options.get("cond_or_uncond") or [0]
        per_chunk = x.shape[0] // len(chunks)
        cond = tuple(i * per_chunk + j for i, kind in enumerate(chunks) if kind == 0 for j in range(per_chunk))
        only_cond = self.options.personal_rows == "cond"
        if only_cond and not cond:
            return None
        merged = None
        if self.merge_per_run and PROMPT_KEY not in transformer_options:  # a trainer's batch prompts: per call
            merged = transformer_options.get(MERGED_KEY)
        fuser = time = None
        if merged is None:
            cond_rows = torch.tensor(cond, dtype=torch.long, device=x.device)
            prompt = transformer_options.get(PROMPT_KEY, self.prompt)
            tokens = subject_tokens(prompt, cond, context.shape[1], timestep_of(sigmas), x.device)
        else:  # what a sampling run keeps: the call's share is its time embedding
            cond_rows, tokens, fuser = merged.layout(self, cond, context.shape[1], x.device, dtype)
            time = merged.time_embedding(self.weights.fuser, sigma, sigmas, timestep_of, dtype)
        if only_cond:
            rows, record_rows = cond_rows, torch.arange(len(cond), device=x.device)
        else:
            rows, record_rows = None, cond_rows
        recording = self.record is not None and sigma is not None and bool(self.record.sigmas)
        step = self.record.step_of(sigma) if recording else None
        regions = None
        if self.options.region is not None:
            hw = tuple(x.shape[-2:])
            levels = partial(region_levels, self.options.region, hw, x.device, dtype)
            regions = levels() if merged is None else merged.kept(("regions", hw, x.device, dtype), levels)
        reading = None
        if self.options.router_mode is RouterMode.ATTENTION:
            reading = self._reading(x, cond_rows, per_chunk, tokens, sigma, transformer_options)
        return MoAStep(rows, record_rows, tokens, step, regions, reading=reading, merged=merged, fuser=fuser, time=time)

    def _reading(self, x, cond_rows, per_chunk, tokens: SubjectTokens, sigma, transformer_options) -> AttentionReading:
        first = tokens.rows == (cond_rows[0] if cond_rows.numel() else -1)  # every cond row has the same words
        subjects = self.prompt.image_embeds.shape[1]
        columns = [tokens.tokens[first & (tokens.subjects == i)] for i in range(subjects)]
        return AttentionReading(
            run=run_of(transformer_options, sigma),
            acting=sigma is None or sigma <= self.sigma_warm,
            read_pixels=read_pixels(tuple(x.shape[-2:]), self.read_level),
            cond_rows=cond_rows,
            latent_of_row=torch.arange(x.shape[0], device=x.device) % per_chunk,
            columns=columns,
        )


class _Shared:
    """Shared by every clone: deepcopy and .to() return the object itself."""

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self

    def to(self, *args, **kwargs) -> "_Shared":
        return self


class MoAInputPatch(_Shared):
    """attn1_patch / attn2_patch: keeps the attention's input for the output patch of the call."""

    def __init__(self, runtime: MoARuntime, cross: bool) -> None:
        self.layers = runtime.attn2_layers if cross else runtime.attn1_layers
        self.key = "moa_attn2_input" if cross else "moa_attn1_input"

    def __call__(self, n, context, value, extra_options, *args, **kwargs):
        block = extra_options.get("block")
        if block is not None and STEP_KEY in extra_options:
            layer = self.layers.get((block[0], block[1], extra_options.get("block_index", 0)))
            if layer is not None:
                extra_options[self.key] = (layer, n, context, value)
        return n, context, value


class MoAOutputPatch(_Shared):
    """attn1_output_patch / attn2_output_patch: personal expert + router, mixed into the prior."""

    def __init__(self, runtime: MoARuntime, cross: bool) -> None:
        self.runtime = runtime
        self.cross = cross
        self.key = "moa_attn2_input" if cross else "moa_attn1_input"

    def models(self) -> list[ModelPatcher]:
        return [self.runtime.weights_patcher]

    def __call__(self, n, extra_options, *args, **kwargs):
        stash = extra_options.pop(self.key, None)
        if stash is None:
            return n
        layer_index, x, context, value = stash
        step: MoAStep = extra_options[STEP_KEY]
        rt = self.runtime
        heads = extra_options["n_heads"]
        same_as_prior = layer_index in rt.same_as_prior
        r1 = None
        if step.reading is not None:
            r1 = self._attention_r1(step.reading, x, context, heads, rt.prior[layer_index], extra_options)
            if r1 is None:
                return n
        probe: TrainingProbe | None = extra_options.get(PROBE_KEY)
        region = None if step.regions is None else _region(step, rt.options, x, extra_options)
        mixing = rt.mixing if probe is None else rt.training_mixing  # training reads every pixel
        if mixing.gather and torch.compiler.is_compiling():  # a gather's size is data: a graph break
            mixing = replace(mixing, gather=False)
        merged = None if probe is not None else self._merged(step, layer_index, x, context, value)
        if merged is not None:
            keys_values = None
            if self.cross:
                keys_values = step.personal_keys_values(context, layer_index, rt, x)
                if keys_values is None:
                    context = self._personal_context(step, context, layer_index)
            attention = partial(_attention, heads=heads, options=extra_options, fused=rt.fused_attention, split=True)
            out, r1 = merged_moa_attention(
                n, x, context, merged, heads, attention, mixing, step.rows, region, r1, keys_values
            )
            return self._keep(step, probe, layer_index, r1, extra_options, out)
        if self.cross:
            fused = self._personal_context(step, context, layer_index)
            same_as_prior = same_as_prior and torch.equal(fused, context)
            value = fused if value is context else value
            context = fused
        on_qk = None
        if probe is not None and self.cross and layer_index in probe.attention_layers:

            def on_qk(q, k):
                probe.attention[layer_index] = subject_attention(q, k, heads, step.tokens)

        attention = partial(_attention, heads=heads, options=extra_options, fused=rt.fused_attention)
        out, r1 = moa_attention(
            n, x, context, value, rt.prior[layer_index], rt.weights.layers[layer_index], attention,
            mixing, step.rows, region, on_qk, same_as_prior, r1,
        )  # fmt: skip
        return self._keep(step, probe, layer_index, r1, extra_options, out)

    def _personal_context(self, step: "MoAStep", context: torch.Tensor, layer_index: int) -> torch.Tensor:
        subjects = step.fused_subjects(context, self.runtime.weights.fuser)
        return personal_context(context, step.tokens, subjects, self.runtime.weights.cross_index[layer_index])

    def _keep(self, step: "MoAStep", probe, layer_index: int, r1, extra_options: dict, out):
        """Hand r1 to the training probe and the router record; returns `out`."""
        rt = self.runtime
        if probe is not None:
            probe.tokens = step.tokens
            probe.router[layer_index] = r1
            probe.grids[layer_index] = _grid(r1.shape[1], extra_options)
        if step.step is not None and step.record_rows.numel():
            hw = _grid(r1.shape[1], extra_options)
            rt.record.add(step.step, layer_index, r1, step.record_rows, hw)
        return out

    def _merged(self, step: MoAStep, layer_index: int, x, context, value) -> MergedLayer | None:
        """The run's MergedLayer for this layer (built by its first call), where it applies: merged
        projections, and keys and values read from x (self-attention) or one context (cross)."""
        if step.merged is None or layer_index not in self.runtime.merge_per_run or value is not context:
            return None
        if not self.cross and context is not x:  # another pack gave self-attention other keys
            return None
        return step.merged.layer(self.runtime, layer_index, x)

    def _attention_r1(self, reading: AttentionReading, x, context, heads, prior: PriorProjections, extra_options):
        """Read the subject words' attention where this is a read layer, then r1 from what was read."""
        hw = _grid(x.shape[1], extra_options)
        if self.cross and x.shape[1] == reading.read_pixels and reading.cond_rows.numel():
            # the prior's own attention to the plain text: where the base model draws each word
            q, k = prior.q(x[reading.cond_rows]), prior.k(context[reading.cond_rows])
            maps = subject_probabilities(q, k, heads, reading.columns)
            reading.run.add(maps.view(*maps.shape[:2], *hw))
        return reading.r1(self.runtime, x.shape[1], hw)


def _attention(q, k, v, heads: int, options: dict, fused: bool, split: bool = False):
    # Looked up per call: the backend the user picked applies to the personal expert too, and
    # through transformer_options so does an override another node set. `split`: q, k, v and the
    # output stay split into heads ([b, h, n, d]); every ComfyUI backend takes and gives them so.
    backend = host_attention.attention_pytorch if fused else host_attention.optimized_attention
    extra = {"skip_reshape": True, "skip_output_reshape": True} if split else {}
    return backend(q, k, v, heads, attn_precision=options.get("attn_precision"), transformer_options=options, **extra)


def _host_weights(prior: PriorProjections, query_dim: int, context_dim: int, inner_dim: int, x) -> HostWeights:
    """The host layer's projections as matrices, by calling them (so LoRA, casting and weight
    streaming apply, as in every call): a linear map's call on the identity is its x @ W matrix."""

    def called(proj, features: int) -> torch.Tensor:
        return proj(torch.eye(features, device=x.device, dtype=x.dtype))

    bias = prior.out(x.new_zeros(1, inner_dim))
    out = called(prior.out, inner_dim) - bias
    q, k, v = called(prior.q, query_dim), called(prior.k, context_dim), called(prior.v, context_dim)
    return HostWeights(q, k, v, out, bias[0])


def _region(step: MoAStep, options: MoAOptions, x: torch.Tensor, extra_options: dict) -> torch.Tensor:
    region = step.regions.get(x.shape[1])
    if region is None:  # a grid the latent's levels did not predict: resize for this layer
        region = region_at(options.region.to(x.device), _grid(x.shape[1], extra_options))
    return region


def _grid(seq_len: int, extra_options: dict) -> tuple[int, int]:
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == seq_len:
        return shape[-2], shape[-1]
    return seq_to_hw(seq_len, tuple(extra_options["original_shape"][-2:]))


class MoAStepWrapper(_Shared):
    """APPLY_MODEL wrapper: plans the call once and hands the plan to the layers. The planning (the
    sigma read on the host, index lists) runs outside the diffusion model, so a compiled diffusion
    model (TorchCompileModel's) traces none of it."""

    def __init__(self, runtime: MoARuntime) -> None:
        self.runtime = runtime

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = transformer_options or {}
        model = executor.class_obj
        timestep_of = partial(_timesteps, model.model_sampling)
        step = self.runtime.plan_step(x, input_dtype(model), t, timestep_of, c_crossattn, transformer_options)
        if step is not None:
            transformer_options = {**transformer_options, STEP_KEY: step}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)


def _timesteps(model_sampling, sigmas: torch.Tensor) -> torch.Tensor:
    return model_sampling.timestep(sigmas).float()


def _first(values: torch.Tensor) -> float:
    """The first value of a tensor, read back in at most one operation (tolist copies to the host)."""
    listed = values.tolist()
    while isinstance(listed, list):
        listed = listed[0]
    return float(listed)


def input_dtype(model) -> torch.dtype:
    """The dtype BaseModel._apply_model casts the diffusion model's input to (0.33: get_dtype_inference)."""
    if hasattr(model, "get_dtype_inference"):
        return model.get_dtype_inference()
    return model.manual_cast_dtype or model.get_dtype()


class MergedRun:
    """What one sampling run keeps with merged projections (in the run's transformer_options:
    attention_router.keep_for_run): the MergedLayers by MoA layer index, each built by the layer's
    first call; the CrossStack; and per model call's layout of subject tokens (which rows are cond
    rows, the context's length) its SubjectTokens and MergedFuser, the region at every UNet level,
    and the fuser's time embedding at every sigma of the run's schedule, computed for the whole
    schedule at the first call."""

    def __init__(self, sigmas: torch.Tensor | None = None) -> None:
        self.layers: dict[int, MergedLayer] = {}
        self.stack: CrossStack | None = None
        self.sigmas = sigmas
        self.memo: dict[tuple, Any] = {}
        self.times: dict[float, torch.Tensor] | None = None

    def layer(self, runtime: MoARuntime, index: int, x: torch.Tensor) -> MergedLayer:
        if self.stack is None and runtime.weights.config.layers[index].is_cross:
            self.cross_stack(runtime, x)  # the layer as its group holds it, whose caches then fill
        merged = self.layers.get(index)
        if merged is None:
            merged = self.layers[index] = self._merge(runtime, index, x)
        return merged

    def cross_stack(self, runtime: MoARuntime, x: torch.Tensor) -> CrossStack:
        if self.stack is None:
            cross = [i for i in sorted(runtime.merge_per_run) if runtime.weights.config.layers[i].is_cross]
            merged = {i: self.layers.get(i) or self._merge(runtime, i, x) for i in cross}
            heads = {i: runtime.heads[i] for i in cross}
            self.stack = cross_stack(merged, runtime.weights.cross_index, heads)
            for group in self.stack.groups:  # the layers keep views of the stack, not copies
                for j, i in enumerate(group.layers):
                    self.layers[i] = replace(merged[i], kv=group.kv[j])
        return self.stack

    def layout(
        self, runtime: MoARuntime, cond: tuple[int, ...], context_length: int, device, dtype
    ) -> tuple[torch.Tensor, SubjectTokens, MergedFuser]:
        """(cond rows, SubjectTokens without timesteps, the MergedFuser) of a call's layout."""

        def build() -> tuple[torch.Tensor, SubjectTokens, MergedFuser]:
            tokens = subject_tokens(runtime.prompt, cond, context_length, None, device)
            fuser = merge_fuser(runtime.weights.fuser, tokens.images, torch.empty(0, device=device, dtype=dtype))
            return torch.tensor(cond, dtype=torch.long, device=device), tokens, fuser

        return self.kept(("layout", cond, context_length, device, dtype), build)

    def kept(self, key: tuple, build: Callable[[], Any]) -> Any:
        """What `build` makes, built once per run for `key`."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def time_embedding(
        self, fuser: Fuser, sigma: float | None, sigmas: torch.Tensor, timestep_of: Callable, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The fuser's time embedding [cond] of a call at `sigma` (its sigmas [b]): the run's
        schedule's, computed for every sigma of it at the first call; else the call's own."""
        if not fuser.config.timestep_conditioning:
            return None
        ref = sigmas.new_empty(0, dtype=dtype) if self.times is None or sigma not in self.times else None
        if self.times is None and self.sigmas is not None:
            embeddings = fuser.time_embedding(timestep_of(self.sigmas.to(sigmas.device)), ref)
            self.times = dict(zip(self.sigmas.tolist(), embeddings.unbind(0), strict=True))
        hit = None if self.times is None else self.times.get(sigma)
        return hit if hit is not None else fuser.time_embedding(timestep_of(sigmas[:1]), ref)[0]

    @staticmethod
    def _merge(runtime: MoARuntime, index: int, x: torch.Tensor) -> MergedLayer:
        spec = runtime.weights.config.layers[index]
        host = _host_weights(runtime.prior[index], spec.query_dim, spec.context_dim, spec.inner_dim, x)
        return merge_layer(runtime.weights.layers[index], host)


class MoARunWrapper(_Shared):
    """OUTER_SAMPLE wrapper: each sampling run starts a fresh router record (and, for a router read
    from attention, a fresh RouterRun; with merged projections, a fresh store of them)."""

    def __init__(self, record: RouterRecord | None, attention: bool = False, merge: bool = False) -> None:
        self.record = record
        self.attention = attention
        self.merge = merge

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        if self.record is not None:
            self.record.begin_run(sigmas.reshape(-1).tolist())
        if self.attention:
            begin_run(executor.class_obj)
        if self.merge:
            keep_for_run(executor.class_obj, MERGED_KEY, MergedRun(sigmas.reshape(-1)))
        samples = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        if self.record is not None:
            self.record.end_run(samples)  # not reached when the run is interrupted: its maps are never read
        return samples


def has_moa(model: ModelPatcher) -> bool:
    return bool(model.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY))


def apply_moa(
    model: ModelPatcher,
    weights_patcher: ModelPatcher,
    prompt: PersonalPrompt,
    options: MoAOptions = MoAOptions(),
    record: RouterRecord | None = None,
    input_names: tuple[str, str] = ("model", "moa_weights"),
    weights_fixed: bool = True,
) -> ModelPatcher:
    """A clone of `model` with MoA patched in. Everything is checked before the clone, so a bad
    input leaves nothing half-applied. `input_names` name the node inputs in error messages.
    `weights_fixed`: the weights stay as they are while the clone is used; a trainer, which
    changes them, passes False (layers with zero deltas then still run the personal expert)."""
    weights: MoAWeights = weights_patcher.model
    if has_moa(model):
        raise MoAError(
            f"{input_names[0]}: this model already has MoA applied; apply MoA once per model "
            "(several subjects go into one MoAApply)"
        )
    check_weights_fit(model, weights, input_names[1])
    if record is not None and record.layer_paths != tuple(weights.paths):
        raise ValueError("the router record was made for other MoA weights")
    modules = attention_modules(model.model.diffusion_model)
    compute_bound = _compute_bound(model.load_device)
    attn1, attn2 = {}, {}
    for i, spec in enumerate(weights.config.layers):
        (attn2 if spec.is_cross else attn1)[spec.block] = i
    sampling = model.get_model_object("model_sampling")
    same_as_prior = frozenset(
        i for i, layer in enumerate(weights.layers) if weights_fixed and layer.personal_is_prior()
    )
    runtime = MoARuntime(
        weights=weights,
        weights_patcher=weights_patcher,
        prior=tuple(_projections(modules[path], compute_bound) for path in weights.paths),
        attn1_layers=attn1,
        attn2_layers=attn2,
        prompt=prompt,
        options=options,
        mixing=options.mixing(gather=compute_bound),
        training_mixing=Mixing(options.strength, options.router_mode),
        sigma_start=sampling.percent_to_sigma(options.start_percent),
        sigma_end=sampling.percent_to_sigma(options.end_percent),
        fused_attention=host_attention.optimized_attention in _MATERIALISING,
        same_as_prior=same_as_prior,
        record=record,
        read_level=read_level(model, options.attention_router.downscale),
        sigma_warm=sampling.percent_to_sigma(
            options.start_percent + options.attention_router.warmup * (options.end_percent - options.start_percent)
        ),
        merge_per_run=frozenset() if compute_bound else _mergeable(modules, weights, weights_fixed) - same_as_prior,
        heads=tuple(getattr(modules[path], "heads", 0) for path in weights.paths),
    )
    patched = model.clone()
    patched.set_model_attn1_patch(MoAInputPatch(runtime, cross=False))
    patched.set_model_attn2_patch(MoAInputPatch(runtime, cross=True))
    patched.set_model_attn1_output_patch(MoAOutputPatch(runtime, cross=False))
    patched.set_model_attn2_output_patch(MoAOutputPatch(runtime, cross=True))
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, MoAStepWrapper(runtime))
    attention, merge = options.router_mode is RouterMode.ATTENTION, bool(runtime.merge_per_run)
    if record is not None or attention or merge:
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, MoARunWrapper(record, attention, merge))
    return patched


def _mergeable(modules: dict, weights: MoAWeights, weights_fixed: bool) -> frozenset[int]:
    """MoA layers whose personal projections can be merged per run: fixed weights (a trainer's
    change between calls), a known head count and bias-free q, k and v (SD's attention), whose call
    on the identity is their matrix."""
    if not weights_fixed:
        return frozenset()
    return frozenset(
        i for i, path in enumerate(weights.paths)
        if getattr(modules[path], "heads", 0)
        and all(getattr(getattr(modules[path], name), "bias", None) is None for name in ("to_q", "to_k", "to_v"))
    )  # fmt: skip


def _compute_bound(device: torch.device) -> bool:
    """Whether MoA's extra matmuls cost more on `device` than launching its extra operations: true
    of the CPU, where sparse pixels are gathered (Mixing.gather) and the personal q/k/v are one
    matmul each (PriorProjections.q_weight and the others). A GPU at SD1.5 sizes waits on Python
    to launch work (the benchmark: an H100's base step takes 29-40 ms at 256 and at 512 px alike),
    so there fewer operations win."""
    return device.type == "cpu"


_PLAIN_LINEAR = tuple(
    cls for cls in (torch.nn.Linear, getattr(comfy.ops.disable_weight_init, "Linear", None),
                    getattr(comfy.ops.manual_cast, "Linear", None)) if cls is not None
)  # fmt: skip
"""Linear layers whose forward is weight (cast, LoRA-patched) times input; quantised ones that
also quantise their input are not, and keep the two-call personal projection."""


def _projections(attn, merge: bool) -> PriorProjections:
    qkv = (attn.to_q, attn.to_k, attn.to_v)
    if not (merge and all(type(m) in _PLAIN_LINEAR and m.bias is None for m in qkv)):
        return PriorProjections(*qkv, attn.to_out)
    return PriorProjections(*qkv, attn.to_out, *(partial(_weight_of, m, called_weight(m)) for m in qkv))


def _weight_of(module: torch.nn.Linear, called: WeightOf, x: torch.Tensor) -> torch.Tensor | None:
    """The weight `module` multiplies x by. Read where its forward would use that very tensor: no
    casting, no weight functions, no hooks, already on x's device in x's dtype (on the CPU, where
    no host streams weights, that is the rule: LoRA and hooked weights are patched in place).
    Otherwise built by calling the module (`called_weight`)."""
    weight = module.weight
    casts = (
        getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
        or getattr(module, "bias_function", None) or module._forward_hooks or module._forward_pre_hooks
    )  # fmt: skip
    if casts or weight.device != x.device or weight.dtype != x.dtype or type(weight.data) is not torch.Tensor:
        return called(x)
    return weight
