"""IP-Adapter state dicts and files with the published key names and shapes, random values.

`sd15_state_dict(kind)` has the real SD1.5 layout (16 cross-attention layers of widths 320, 640,
1280 in diffusers' processor order, keys 1, 3, ..., 31); `state_dict_for(model, kind)` the same
layout for any loaded model (the tiny test UNets). Kinds: "sd15" (and "light_v11", the same
shapes), "plus" (and "plus-face"), "full-face", "sdxl" (an SDXL ip-adapter_sdxl_vit-h's
image projection and two of its layers). `sdxl_state_dict(name)` has a published SDXL file's
shapes: its real image projection and its 70 layers' projections as meta tensors (shapes only;
the files are 700 MB to 1 GB).
"""

from pathlib import Path

import torch

SD15_LAYER_DIMS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
"""Inner widths of SD1.5's cross-attention layers in file order: input 1, 2, 4, 5, 7, 8, output 3-11, middle."""

SDXL_LAYER_DIMS = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10
"""SDXL's 70 in file order: input 4, 5 (2 layers each), 7, 8 (10 each), output 0-2 (10), 3-5 (2), middle (10)."""

SDXL_TRANSFORMERS = [t for t, depth in enumerate((2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2)) for _ in range(depth)]
"""ComfyUI's transformer_index of each of SDXL's 70 cross-attention layers, in execution order."""

SDXL_FILES = {  # name: (kind, image encoder output width); plus files' Resampler is 1280 wide with 20 heads
    "ip-adapter_sdxl_vit-h.safetensors": ("sd15", 1024),
    "ip-adapter_sdxl.safetensors": ("sd15", 1280),  # OpenCLIP ViT-bigG image embeds
    "ip-adapter-plus_sdxl_vit-h.safetensors": ("plus", 1280),
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": ("plus-face", 1280),
}


def image_proj(
    kind: str, context_dim: int = 768, generator: torch.Generator | None = None, embed: int = 1024, width: int = 768
) -> dict:
    """The `image_proj.*` tensors of a file of `kind` (without the prefix). `embed`: the linear kinds'
    image-embeds width; `width`: the Resampler's (768 in SD1.5's plus files, 1280 in SDXL's)."""
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, std=0.1), f"{prefix}.bias": rand(dim)}

    if kind in ("sd15", "light_v11", "sdxl"):
        return {
            "proj.weight": rand(4 * context_dim, embed),
            "proj.bias": rand(4 * context_dim),
            **norm("norm", context_dim),
        }
    if kind == "full-face":
        return {
            "proj.0.weight": rand(1280, 1280), "proj.0.bias": rand(1280),
            "proj.2.weight": rand(context_dim, 1280), "proj.2.bias": rand(context_dim),
            **norm("proj.3", context_dim),
        }  # fmt: skip
    if kind in ("plus", "plus-face"):
        out = {
            "latents": torch.randn(1, 16, width, generator=g) / width**0.5,
            "proj_in.weight": rand(width, 1280), "proj_in.bias": rand(width),
            "proj_out.weight": rand(context_dim, width), "proj_out.bias": rand(context_dim),
            **norm("norm_out", context_dim),
        }  # fmt: skip
        for i in range(4):
            out |= norm(f"layers.{i}.0.norm1", width) | norm(f"layers.{i}.0.norm2", width)
            out[f"layers.{i}.0.to_q.weight"] = rand(width, width)
            out[f"layers.{i}.0.to_kv.weight"] = rand(2 * width, width)
            out[f"layers.{i}.0.to_out.weight"] = rand(width, width)
            out |= norm(f"layers.{i}.1.0", width)
            out[f"layers.{i}.1.1.weight"] = rand(4 * width, width)
            out[f"layers.{i}.1.3.weight"] = rand(width, 4 * width)
        return out
    raise ValueError(kind)


def state_dict_with(layer_dims, kind: str, context_dim: int = 768, seed: int = 0, std: float = 0.05) -> dict:
    """A whole file's flat state dict: image_proj.* plus ip_adapter.<2i+1>.to_{k,v}_ip.weight."""
    g = torch.Generator().manual_seed(seed)
    out = {f"image_proj.{k}": v for k, v in image_proj(kind, context_dim, g).items()}
    for i, dim in enumerate(layer_dims):
        for name in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{name}.weight"] = torch.randn(dim, context_dim, generator=g) * std
    return out


def sd15_state_dict(kind: str, seed: int = 0) -> dict:
    if kind == "sdxl":  # two of its 70 layers: enough to be told apart (2048-d text), 1/35 of the size
        return state_dict_with((640, 1280), kind, context_dim=2048, seed=seed)
    return state_dict_with(SD15_LAYER_DIMS, kind, seed=seed)


def sdxl_state_dict(name: str, seed: int = 0) -> dict:
    """The published SDXL file `name` (a key of SDXL_FILES): image projection with random values,
    layers as meta tensors of their real shapes (for `read_spec` and the fit checks, not for loading)."""
    kind, encoder = SDXL_FILES[name]
    g = torch.Generator().manual_seed(seed)
    proj = image_proj(kind, 2048, g, embed=encoder, width=1280)
    out = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, dim in enumerate(SDXL_LAYER_DIMS):
        for projection in ("to_k_ip", "to_v_ip"):
            out[f"ip_adapter.{2 * i + 1}.{projection}.weight"] = torch.empty(dim, 2048, device="meta")
    return out


def state_dict_for(model, kind: str, seed: int = 0, std: float = 0.05) -> dict:
    """An IP-Adapter for a loaded model's cross-attention layers (file order: down, up, mid)."""
    from comfyui_moa.nodes.host.ipadapter import _FILE_ORDER, _order, cross_attention_paths
    from comfyui_moa.nodes.host.unet_layers import attention_modules

    modules = attention_modules(model.model.diffusion_model)
    layers = [modules[p].to_k for p in _order(cross_attention_paths(model), _FILE_ORDER)]
    return state_dict_with([k.out_features for k in layers], kind, layers[0].in_features, seed=seed, std=std)


def write(state_dict: dict, path: str | Path, pickle: bool = False) -> Path:
    """The state dict as a .safetensors file (fp16 like the published ones) or, `pickle`, as a .bin
    in the {"image_proj": ..., "ip_adapter": ...} layout the original releases use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half().contiguous() for k, v in state_dict.items()}
    if pickle:
        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in tensors.items():
            group, rest = key.split(".", 1)
            nested[group][rest] = value
        torch.save(nested, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    return path


def write_clip_vision_vith(path: str | Path, seed: int = 3) -> Path:
    """A random CLIP ViT-H/14 vision model (32 layers, hidden 1280, projection 1024, 224 px) that
    `comfy.clip_vision.load` recognises as ViT-H (it tells the encoders apart by their layer count,
    so a smaller stand-in would load as something else): ComfyUI's own config and key names, fp16,
    1.26 GB. Its `encode_image` gives image_embeds [n, 1024] and penultimate hidden states [n, 257, 1280]."""
    import comfy.clip_vision

    from moa_testing.model_files import _save_fp16, init_weights_

    json_config = Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")
    encoder = comfy.clip_vision.ClipVisionModel(str(json_config))
    init_weights_(encoder.model, seed)
    return _save_fp16(encoder.get_sd(), path)


def write_ipadapter_for_checkpoint(path: str | Path, checkpoint: str | Path, kind: str = "plus", seed: int = 4) -> Path:
    """An IP-Adapter file of `kind` (real key names; layer widths of the checkpoint's UNet), fp16."""
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    return write(state_dict_for(model, kind, seed=seed, std=0.2), path)
