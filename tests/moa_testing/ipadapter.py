"""Helpers of the IP-Adapter tests: subjects as MoA Subject makes them, an adapter for a tiny
model, and the adapter applied through the host glue as the apply node applies it."""

import torch

from comfyui_moa.moa_core.attention_router import AttentionRouterConfig
from comfyui_moa.moa_core.ipadapter import build_ipadapter
from comfyui_moa.moa_core.subject import Subject
from comfyui_moa.nodes.host.ipadapter import build_runtime, check_adapter_fits
from comfyui_moa.nodes.host.ipadapter_patch import apply_ipadapter
from moa_testing.ipadapter_files import state_dict_for
from moa_testing.tiny import model_patcher

PROMPT = 77


def subjects(count: int = 1, seed: int = 20) -> list[Subject]:
    g = torch.Generator().manual_seed(seed)
    return [
        Subject(torch.randn(1024, generator=g), torch.zeros(1, 224, 224, 3), 1024, torch.randn(257, 1280, generator=g))
        for _ in range(count)
    ]


def adapter_for(model, kind: str, seed: int = 0, std: float = 0.2):
    return build_ipadapter(state_dict_for(model, kind, seed=seed, std=std), "test")


def outputs_of(adapter, people) -> torch.Tensor:
    key = "embedding" if adapter.spec.encoder_output == "image_embeds" else "hidden_states"
    return torch.stack([getattr(p, key) for p in people])


def negative_of(adapter) -> torch.Tensor:
    if adapter.spec.encoder_output == "image_embeds":
        return torch.zeros(1, adapter.spec.encoder_dim)
    return torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(99))  # a "black image" stand-in


def with_adapter(model, adapter, people, positions=((5,),), record=None, subject_record=None, **options):
    paths = check_adapter_fits(model, adapter.spec, "test")
    settings = {
        "weight": 1.0,
        "weight_type": "linear",
        "start_percent": 0.0,
        "end_percent": 1.0,
        "router_mode": "personal everywhere",
        "router": AttentionRouterConfig(),
        "sparse_threshold": 0.0,
        "input_name": "test",
    } | options
    runtime = build_runtime(
        model, model_patcher(adapter), outputs_of(adapter, people), negative_of(adapter), positions, PROMPT,
        settings, paths, record, subject_record,
    )  # fmt: skip
    return apply_ipadapter(model, runtime, "test")


def tiny_clip_vision_h(folder, seed: int = 0):
    """A 2-layer CLIP vision model with ViT-H/14's output sizes (hidden 1280, 257 tokens from 14 px
    patches, 1024-d image_embeds) in ComfyUI's class; a real ViT-H file is 1.2 GB."""
    import json
    from pathlib import Path

    import comfy.clip_vision

    from moa_testing.tiny import fill_

    config = {
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 224,
        "intermediate_size": 256,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 14,
        "projection_dim": 1024,
    }
    path = Path(folder) / "tiny_clip_vision_h.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    fill_(clip_vision.model, seed, std=0.05)
    return clip_vision
