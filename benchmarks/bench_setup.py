"""What bench_sampling.py measures on: models built at run time in ComfyUI's own classes.

Nothing here is downloaded: the SD1.5 UNet, the CLIP-vision ViT-L and the MoA weights get random
values, which is all a timing needs (the cost of a matmul does not depend on the numbers in it).
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import moa_pack  # noqa: E402  (the repo root goes on sys.path first)

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
"""The full SD1.5 UNet (859.5 M parameters, 16 transformer blocks, 32 attention layers)."""

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip
"""The full SDXL UNet (2567 M parameters, 70 transformer blocks, 140 attention layers)."""

TINY_UNET = {
    **SD15_UNET,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
    "transformer_depth_output": [1, 1, 0, 0],
}  # fmt: skip
"""A 1 M-parameter UNet of the same family, for checking the benchmark itself in seconds."""

UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}
"""The benchmarks' --model choices."""

VISION_CONFIG = "clip_vision_config_vitl.json"
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}

SUBJECT_TOKEN = 5  # where the subject word sits in the benchmark's 77-token prompt


def use_host(attention: str) -> None:
    """Import ComfyUI (on the CPU unless a GPU is present) with the chosen attention backend.

    The backend is picked when comfy.ldm.modules.attention is first imported, so a choice other
    than "default" only takes effect in a fresh process."""
    moa_pack.load()
    moa_pack.use_host(cpu=not torch.cuda.is_available())
    import comfy.cli_args

    flag = {"pytorch": "use_pytorch_cross_attention", "split": "use_split_cross_attention"}.get(attention)
    if flag is not None:
        setattr(comfy.cli_args.args, flag, True)
    elif attention == "sub_quad":
        comfy.cli_args.args.use_quad_cross_attention = True


def fill_(module: torch.nn.Module, seed: int, std: float) -> None:
    """ComfyUI builds modules uninitialised: give every parameter seeded normal values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def build_unet(config: dict, seed: int = 0):
    """A ModelPatcher around an SD1.5- or SDXL-family UNet (SDXL: `config` has a 2048-d context) with
    normal(0, 0.02) weights, in the dtype ComfyUI would run it in on this device (fp16 on a GPU, fp32 on the CPU)."""
    import comfy.model_management as mm
    import comfy.supported_models
    from comfy.model_patcher import ModelPatcher

    family = comfy.supported_models.SDXL if config["context_dim"] == 2048 else comfy.supported_models.SD15
    model_config = family(dict(config))
    supported = model_config.supported_inference_dtypes
    dtype = mm.unet_dtype(supported_dtypes=supported)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(), supported))
    model = model_config.get_model({})
    fill_(model, seed, std=0.02)
    return ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_moa(model, rank: int = 0, seed: int = 1):
    """MoA weights for `model` ("MoA init" layout) with every part random, as if trained: deltas of
    half the base weights' scale, and routers whose r1 spreads over (0, 1) on every layer."""
    from comfyui_moa.moa_core import moa_init
    from comfyui_moa.nodes.host.unet_layers import layer_specs, model_family

    unet = model.model.diffusion_model
    weights = moa_init(model_family(model), layer_specs(unet), delta_rank=rank)
    fill_(weights, seed, std=0.01)
    for i, (spec, layer) in enumerate(zip(weights.config.layers, weights.layers, strict=True)):
        # the router reads the block's layer-normed input x = z * gamma + beta (random gamma, beta):
        # scale fc1 to gamma and cancel beta, which every pixel shares, so r1 varies across pixels
        block, attn = spec.path.rsplit(".", 1)
        norm = unet.get_submodule(f"{block}.{'norm1' if attn == 'attn1' else 'norm2'}")
        fc1, gamma, beta = layer.router.fc1, norm.weight.detach().float().cpu(), norm.bias.detach().float().cpu()
        fill_(fc1, seed + 1 + i, std=1.0 / (float(gamma.pow(2).mean().sqrt()) * fc1.in_features**0.5))
        with torch.no_grad():
            fc1.bias.copy_(-(fc1.weight @ beta))
        fill_(layer.router.fc2, seed + 101 + i, std=2.0 * layer.router.fc2.in_features**-0.5)
    return weights.eval().requires_grad_(False)


def weights_patcher(weights):
    """The MoA weights as MoA Loader hands them on: a ModelPatcher in the UNet's dtype."""
    import comfy.model_management as mm
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(
        weights.to(mm.unet_dtype()), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def conditioning(seed: int = 3, context_dim: int = 768):
    """(positive, negative, prompt): random 77-token text embeddings (SDXL's 2048-d ones with a pooled
    output) and one subject bound to a word."""
    from comfyui_moa.moa_core import PersonalPrompt

    generator = torch.Generator().manual_seed(seed)
    conds = []
    for _ in range(2):
        extra = {"pooled_output": torch.randn(1, 1280, generator=generator)} if context_dim == 2048 else {}
        conds.append([[torch.randn(1, 77, context_dim, generator=generator), extra]])
    positive, negative = conds
    image = torch.randn(1, 768, generator=generator)
    return positive, negative, PersonalPrompt.single(77, [SUBJECT_TOKEN], [0], image)


def centred_square(area: float, size: int = 512, outside: float = 0.0) -> torch.Tensor | None:
    """A region [size, size]: 1 in a centred square covering `area` of the image, `outside`
    elsewhere (None for 1 everywhere)."""
    if area >= 1.0 or outside >= 1.0:
        return None
    side = round(size * area**0.5)
    start = (size - side) // 2
    region = torch.full((size, size), outside)
    region[start : start + side, start : start + side] = 1.0
    return region


def clip_vision(tiny: bool, seed: int = 4):
    """ComfyUI's ClipVisionModel from its ViT-L/14 config (or a 2-layer one), random weights."""
    import tempfile

    import comfy.clip_vision

    path = Path(comfy.clip_vision.__file__).parent / VISION_CONFIG
    if tiny:
        config = {**json.loads(path.read_text()), **TINY_VISION}
        path = Path(tempfile.mkdtemp(prefix="moa-bench-")) / "tiny_vision.json"
        path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    fill_(model.model, seed, std=0.02)
    return model
