"""Bind an IP-Adapter to a loaded model and its subjects: every check before the clone, then the patch."""

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from comfy.model_patcher import ModelPatcher

from ...moa_core import RouterRecord, WeightsMismatchError, block_key
from ...moa_core.attention_router import AttentionRouterConfig
from ...moa_core.errors import ConditioningError
from ...moa_core.ipadapter import IMAGE_EMBEDS, IPAdapter, IPAdapterSpec, encoder_name, layer_weights
from .attention_router import read_level
from .ipadapter_patch import IPLayerBinding, IPRuntime, fused_attention
from .unet_layers import attention_modules, model_family

CONVERTER = Path(__file__).resolve().parents[2] / "tools" / "convert_ipadapter.py"
_FILE_ORDER = {"input": 0, "output": 1, "middle": 2}  # diffusers' processor order: down, up, mid
_RUN_ORDER = {"input": 0, "middle": 1, "output": 2}  # execution order (ComfyUI's transformer_index)
_EXAMPLE_FILES = {"sd15": "ip-adapter-plus_sd15.safetensors", "sdxl": "ip-adapter-plus_sdxl_vit-h.safetensors"}


def convert_command() -> str:
    """The one-line command that turns a pickled IP-Adapter into safetensors (the interpreter running now)."""
    return f'"{sys.executable}" "{CONVERTER}"'


def cross_attention_paths(model: ModelPatcher) -> list[str]:
    """The model's cross-attention layer paths, UNet order."""
    return [path for path in attention_modules(model.model.diffusion_model) if path.endswith(".attn2")]


def transformer_indices(run_ordered: Sequence[str]) -> list[int]:
    """ComfyUI's transformer_index of each layer (execution order): its SpatialTransformer's rank."""
    blocks = [block_key(path.rsplit(".", 1)[0])[:2] for path in run_ordered]
    ranks = {block: rank for rank, block in enumerate(dict.fromkeys(blocks))}
    return [ranks[block] for block in blocks]


def _order(paths: Sequence[str], rank: dict) -> list[str]:
    def key(path: str):
        name, block_id, index = block_key(path.rsplit(".", 1)[0])
        return rank[name], block_id, index

    return sorted(paths, key=key)


def check_adapter_fits(model: ModelPatcher, spec: IPAdapterSpec, input_name: str) -> list[str]:
    """WeightsMismatchError unless the adapter of `spec` was made for this model; the layers in file order."""
    family = model_family(model)
    if family != spec.family:
        raise WeightsMismatchError(
            f"{input_name}: this IP-Adapter is for {spec.family} models ({spec.context_dim}-d text) and the model is "
            f"{family or 'not one MoA supports'}; load the IP-Adapter made for {family or 'SD1.5'} "
            f"(e.g. {_EXAMPLE_FILES.get(family, _EXAMPLE_FILES['sd15'])})"
        )
    paths = _order(cross_attention_paths(model), _FILE_ORDER)
    modules = attention_modules(model.model.diffusion_model)
    dims = [(modules[p].to_k.in_features, modules[p].to_k.out_features) for p in paths]
    wanted = [(spec.context_dim, dim) for dim in spec.layer_dims]
    if dims != wanted:
        raise WeightsMismatchError(
            f"{input_name}: this IP-Adapter has {len(wanted)} cross-attention layers of widths "
            f"{sorted(set(spec.layer_dims))} and the model {len(dims)} of {sorted({d for _, d in dims})}; "
            "use an IP-Adapter made for this model's architecture"
        )
    return paths


def check_subjects(subjects: Sequence, adapter: IPAdapter, input_name: str) -> torch.Tensor:
    """The CLIP-vision output each subject gives the adapter: [s, e] embeds or [s, 257, e] hidden states."""
    spec = adapter.spec
    outputs = []
    for i, subject in enumerate(subjects):
        if spec.encoder_output == IMAGE_EMBEDS:
            found, width = subject.embedding, subject.encoder_dim
        else:
            found = subject.hidden_states
            width = None if found is None else found.shape[-1]
        if width != spec.encoder_dim:
            have = encoder_name(spec.encoder_output, width) if width else "a CLIP vision model without hidden states"
            raise WeightsMismatchError(
                f"{input_name}: subject {i + 1} was encoded by {have}; this {spec.kind} IP-Adapter reads "
                f"{spec.encoder_name} {spec.encoder_output} ({spec.encoder_dim}-d). Load {spec.encoder_name} "
                "(e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision) in the CLIPVisionLoader "
                "that feeds MoA Subject"
            )
        outputs.append(found.float())
    return torch.stack(outputs)


def negative_output(adapter: IPAdapter, clip_vision, input_name: str) -> torch.Tensor:
    """What the uncond rows' image tokens are made from, as IP-Adapter makes them: zero image
    embeds, or (plus, full-face) the hidden states of a black image -> [1, ...]."""
    spec = adapter.spec
    if spec.encoder_output == IMAGE_EMBEDS:
        return torch.zeros(1, spec.encoder_dim)
    if clip_vision is None:
        raise ConditioningError(
            f"{input_name}: a {spec.kind} IP-Adapter gives the negative prompt's rows the tokens of a black image, "
            "which needs the CLIP vision model; connect the CLIPVisionLoader that feeds MoA Subject"
        )
    hidden = clip_vision.encode_image(torch.zeros(1, 224, 224, 3), crop=True).penultimate_hidden_states
    if hidden.shape[-1] != spec.encoder_dim:
        raise WeightsMismatchError(
            f"{input_name}: this CLIP vision model gives {hidden.shape[-1]}-d hidden states; the IP-Adapter reads "
            f"{spec.encoder_name} ({spec.encoder_dim}-d). Load {spec.encoder_name}"
        )
    return hidden.float().cpu()


def build_runtime(
    model: ModelPatcher,
    adapter_patcher: ModelPatcher,
    subject_outputs: torch.Tensor,
    negative: torch.Tensor,
    positions: Sequence[Sequence[int]],
    prompt_length: int,
    options: dict,
    file_paths: list[str],
    record: RouterRecord | None,
    subject_record: RouterRecord | None = None,
) -> IPRuntime:
    """The runtime of apply_ipadapter. `options`: weight, weight_type, start_percent, end_percent,
    router_mode, router (AttentionRouterConfig), sparse_threshold, input_name."""
    adapter: IPAdapter = adapter_patcher.model
    modules = attention_modules(model.model.diffusion_model)
    ordered = _order(file_paths, _RUN_ORDER)
    weights = layer_weights(
        options["weight_type"], options["weight"], transformer_indices(ordered), model_family(model),
        options["input_name"],
    )  # fmt: skip
    unet_paths = cross_attention_paths(model)
    layers = {}
    for run_index, path in enumerate(ordered):
        attn = modules[path]
        layers[block_key(path.rsplit(".", 1)[0])] = IPLayerBinding(
            unet_paths.index(path), file_paths.index(path), weights[run_index], attn.to_q, attn.to_k, attn.to_out[0]
        )
    with torch.no_grad():
        cond_tokens = adapter.image_tokens(subject_outputs).float().cpu()
        uncond_tokens = adapter.image_tokens(negative).float().cpu().expand(len(cond_tokens), -1, -1)
    sampling = model.get_model_object("model_sampling")
    router: AttentionRouterConfig = options["router"]
    start, end = options["start_percent"], options["end_percent"]
    return IPRuntime(
        adapter=adapter,
        adapter_patcher=adapter_patcher,
        layers=layers,
        layer_paths=tuple(unet_paths),
        cond_tokens=cond_tokens,
        uncond_tokens=uncond_tokens.contiguous(),
        positions=tuple(tuple(p) for p in positions),
        prompt_length=prompt_length,
        router_mode=options["router_mode"],
        router=router,
        sigma_start=sampling.percent_to_sigma(start),
        sigma_end=sampling.percent_to_sigma(end),
        sigma_warm=sampling.percent_to_sigma(start + router.warmup * (end - start)),
        read_level=read_level(model, router.downscale),
        sparse_threshold=options["sparse_threshold"],
        fused_attention=fused_attention(),
        record=record,
        subject_record=subject_record,
    )
