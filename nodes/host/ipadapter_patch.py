"""IP-Adapter experts in the MoA patch protocol: list hooks and wrappers on a clone, nothing replaced.

The same shape as patch.py's MoA patch: an APPLY_MODEL wrapper plans each model call once,
attn2 input patches keep the cross-attention's input, attn2 output patches (which see the prior's
output with everything ComfyUI and other packs put in it) add the experts' weighted difference,
and an OUTER_SAMPLE wrapper starts the run: a fresh router record and a fresh RouterRun (the
attention router's accumulated maps) placed in this run's transformer_options, so the patch
objects, which clones share, hold no state of any run. Self-attention is not touched: IP-Adapter
experts are the prior there. The maths is moa_core's (mixture, attention_router).
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import WrappersMP

from ...moa_core import MoAError, RouterRecord
from ...moa_core.attention_router import AttentionRouterConfig, RouterRun, subject_probabilities, union
from ...moa_core.errors import ConditioningError
from ...moa_core.helpers import like
from ...moa_core.ipadapter import IPAdapter
from ...moa_core.mixture import RouterMode, image_attention_difference, kept_pixels, mix_differences
from .attention_router import begin_run, layer_masks, read_pixels, run_of
from .patch import _MATERIALISING, _PLAIN_LINEAR, WRAPPER_KEY, _attention, _grid, _Shared, _weight_of, has_moa

STEP_KEY = "moa_ipadapter_step"
INPUT_KEY = "moa_ipadapter_input"
ATTENTION = "from attention"
ROUTER_MODES = (ATTENTION, RouterMode.PERSONAL.value, RouterMode.PRIOR.value)


@dataclass(frozen=True)
class IPLayerBinding:
    """One cross-attention layer of the model and its IP-Adapter layer."""

    index: int  # into IPRuntime.layer_paths (UNet order): the router record's layer index
    adapter_layer: int  # into IPAdapter.layers
    weight: float  # the layer's weight (preset x weight)
    to_q: torch.nn.Module
    to_k: torch.nn.Module
    to_out: torch.nn.Module  # the Linear of to_out: its matrix maps the image attention into the output


@dataclass(frozen=True)
class IPRuntime:
    """Everything the patch objects share; fixed when the node runs."""

    adapter: IPAdapter
    adapter_patcher: ModelPatcher
    layers: dict  # block key -> IPLayerBinding
    layer_paths: tuple[str, ...]  # the cross-attention layers, UNet order
    cond_tokens: torch.Tensor  # [s, t, d] each subject's image tokens
    uncond_tokens: torch.Tensor  # [s, t, d] the zero/black image's tokens, for the uncond rows
    positions: tuple[tuple[int, ...], ...]  # per subject: its word's token positions in the prompt
    prompt_length: int
    router_mode: str  # one of ROUTER_MODES
    router: AttentionRouterConfig
    sigma_start: float
    sigma_end: float
    sigma_warm: float  # the attention router acts at sigmas at or below this
    read_level: int  # the UNet level whose cross-attention the router reads (2: 16x16 at 512 px)
    sparse_threshold: float
    fused_attention: bool
    record: RouterRecord | None = None
    subject_record: RouterRecord | None = None
    """Each subject's own weights: [b * s, h, w] per (step, layer), latent-major (tests and
    diagnostics; the record above holds their union, what MoA Router Masks shows)."""

    def plan_step(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict) -> "IPStep | None":
        if self.router_mode == RouterMode.PRIOR.value:
            return None
        sigmas = transformer_options.get("sigmas")
        sigma = None if sigmas is None else float(sigmas.reshape(-1)[0])  # the one host sync of a call
        if sigma is not None and not self.sigma_end <= sigma <= self.sigma_start:
            return None
        run = run_of(transformer_options, sigma)
        chunks = transformer_options.get("cond_or_uncond") or [0]
        per_chunk = x.shape[0] // len(chunks)
        kinds = torch.tensor([kind for kind in chunks for _ in range(per_chunk)])
        cond_rows = (kinds == 0).nonzero()[:, 0].to(x.device)
        length = context.shape[1]
        if length % self.prompt_length:
            raise ConditioningError(
                f"the positive conditioning has {length} tokens, which does not fit the {self.prompt_length}-token "
                "prompt the IP-Adapter subjects were bound to; use the CONDITIONING output of MoA IP-Adapter Apply"
            )
        copies = torch.arange(length // self.prompt_length) * self.prompt_length
        columns = [(torch.tensor(p)[None] + copies[:, None]).reshape(-1).to(x.device) for p in self.positions]
        acting = self.router_mode != ATTENTION or sigma is None or sigma <= self.sigma_warm
        record = self.record or self.subject_record
        recording = record is not None and sigma is not None and bool(record.sigmas)
        return IPStep(
            cond=(kinds == 0).to(x.device),
            latent_of_row=torch.arange(x.shape[0], device=x.device) % per_chunk,
            cond_rows=cond_rows,
            columns=columns,
            latents=per_chunk,
            read_pixels=read_pixels(tuple(x.shape[-2:]), self.read_level),
            acting=acting,
            run=run,
            step=record.step_of(sigma) if recording else None,
        )


@dataclass(frozen=True)
class IPStep:
    """What one model call needs, decided once per call."""

    cond: torch.Tensor  # bool [B]: cond rows
    latent_of_row: torch.Tensor  # long [B]: which latent of the batch each row is (its cond row's index)
    cond_rows: torch.Tensor  # long [b]
    columns: list  # per subject: long [c] its token columns in the context
    latents: int  # latents in the batch (rows per chunk)
    read_pixels: int  # pixel count of the layers the router reads
    acting: bool  # past the warm-up (or a router that needs none)
    run: RouterRun
    step: int | None  # sampling step, when recording
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # (pixels, run version) -> [b, s, n]


class IPInputPatch(_Shared):
    """attn2_patch: keeps the cross-attention's input for the output patch."""

    def __init__(self, runtime: IPRuntime) -> None:
        self.layers = runtime.layers

    def __call__(self, n, context, value, extra_options, *args, **kwargs):
        block = extra_options.get("block")
        if block is not None and STEP_KEY in extra_options:
            layer = self.layers.get((block[0], block[1], extra_options.get("block_index", 0)))
            if layer is not None:
                extra_options[INPUT_KEY] = (layer, n, context)
        return n, context, value


class IPOutputPatch(_Shared):
    """attn2_output_patch: prior + sum_i m_i * (personal_i - prior), m from the router."""

    def __init__(self, runtime: IPRuntime) -> None:
        self.runtime = runtime

    def models(self) -> list[ModelPatcher]:
        return [self.runtime.adapter_patcher]

    def __call__(self, n, extra_options, *args, **kwargs):
        stash = extra_options.pop(INPUT_KEY, None)
        if stash is None:
            return n
        layer, x, context = stash
        step: IPStep = extra_options[STEP_KEY]
        rt = self.runtime
        heads = extra_options["n_heads"]
        hw = _grid(x.shape[1], extra_options)
        q = None
        if rt.router_mode == ATTENTION and x.shape[1] == step.read_pixels and step.cond_rows.numel():
            q = layer.to_q(x)
            keys = layer.to_k(context[step.cond_rows])
            probs = subject_probabilities(q[step.cond_rows], keys, heads, step.columns)
            step.run.add(probs.view(*probs.shape[:2], *hw))
        if not step.acting or layer.weight == 0.0:
            return n
        masks = self._masks(step, x.shape[1], hw)  # [b, s, n] per latent, or None: nothing read yet
        if masks is None:
            return n
        if step.step is not None and step.cond_rows.numel():
            cond_masks = masks[step.latent_of_row[step.cond_rows]]
            if rt.record is not None:
                rt.record.add(step.step, layer.index, union(cond_masks).reshape(-1, *hw))
            if rt.subject_record is not None:
                rt.subject_record.add(step.step, layer.index, cond_masks.reshape(-1, *hw))
        w = (masks[step.latent_of_row] * layer.weight).movedim(1, 0)[..., None]  # [s, B, n, 1]
        rows = pixels = None
        if rt.sparse_threshold > 0.0:
            rows, pixels, _ = kept_pixels(w.sum(dim=0), rt.sparse_threshold)
            if rows is not None and rows.numel() == 0:
                return n
            if rows is not None:
                x, w, q = x[rows], w[:, rows], None if q is None else q[rows]
            if pixels is not None:
                x, w = x.index_select(1, pixels), w.index_select(2, pixels)
                q = None if q is None else q.index_select(1, pixels)
        q = layer.to_q(x) if q is None else q
        cond = step.cond if rows is None else step.cond[rows]
        ip = rt.adapter.layers[layer.adapter_layer]
        keys, values = (self._tokens(proj.weight, cond, x) for proj in (ip.to_k_ip, ip.to_v_ip))
        attention = partial(_attention, heads=heads, options=extra_options, fused=rt.fused_attention)
        difference = image_attention_difference(q, keys, values, w, attention)
        return mix_differences(n, _out_matrix(layer.to_out, difference), rows, pixels)

    def _masks(self, step: IPStep, pixels: int, hw: tuple[int, int]) -> torch.Tensor | None:
        rt = self.runtime
        if rt.router_mode != ATTENTION:
            return torch.ones(step.latents, len(rt.positions), pixels, device=step.cond.device)
        return layer_masks(step.run, step.masks, pixels, hw, rt.router)

    def _tokens(self, weight: torch.Tensor, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Image keys or values [s, b, t, inner] for rows whose kind is `cond` (bool [b])."""
        rt = self.runtime
        weight = like(weight, x)
        cond_kv = F.linear(like(rt.cond_tokens, x), weight)  # [s, t, inner]
        uncond_kv = F.linear(like(rt.uncond_tokens, x), weight)
        return torch.where(cond[None, :, None, None], cond_kv[:, None], uncond_kv[:, None])


def _out_matrix(module: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
    """to_out's matrix times a (no bias): the weight where its forward would use that very tensor
    (patch._weight_of), else the module called twice, on a and on zeros, and subtracted."""
    weight = _weight_of(module, lambda x: None, a) if type(module) in _PLAIN_LINEAR else None
    if weight is not None:
        return F.linear(a, weight)
    return module(a) - module(a.new_zeros(1, a.shape[-1]))


class IPStepWrapper(_Shared):
    """APPLY_MODEL wrapper: plans the call once, outside the diffusion model (patch.MoAStepWrapper)."""

    def __init__(self, runtime: IPRuntime) -> None:
        self.runtime = runtime

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        transformer_options = transformer_options or {}
        step = self.runtime.plan_step(x, c_crossattn, transformer_options)
        if step is not None:
            transformer_options = {**transformer_options, STEP_KEY: step}
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)


class IPRunWrapper(_Shared):
    """OUTER_SAMPLE wrapper: each sampling run starts a fresh router record and RouterRun."""

    def __init__(self, *records: RouterRecord | None) -> None:
        self.records = [r for r in records if r is not None]

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        for record in self.records:
            record.begin_run(sigmas.reshape(-1).tolist())
        begin_run(executor.class_obj)
        samples = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        for record in self.records:
            record.end_run(samples)  # MoA Router Masks finds this run's maps by its samples
        return samples


def apply_ipadapter(model: ModelPatcher, runtime: IPRuntime, input_name: str) -> ModelPatcher:
    """A clone of `model` with the IP-Adapter experts patched into its cross-attention. The caller
    has checked everything; this only refuses a model that already has MoA."""
    if has_moa(model):
        raise MoAError(
            f"{input_name}: this model already has MoA applied; apply MoA once per model "
            "(several subjects go into one apply node)"
        )
    patched = model.clone()
    patched.set_model_attn2_patch(IPInputPatch(runtime))
    patched.set_model_attn2_output_patch(IPOutputPatch(runtime))
    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, IPStepWrapper(runtime))
    patched.add_wrapper_with_key(
        WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, IPRunWrapper(runtime.record, runtime.subject_record)
    )
    return patched


def fused_attention() -> bool:
    import comfy.ldm.modules.attention as host_attention

    return host_attention.optimized_attention in _MATERIALISING
