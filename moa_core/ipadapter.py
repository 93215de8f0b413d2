"""IP-Adapter files as MoA personal experts for cross-attention.

IP-Adapter (Ye et al. 2023) gives every cross-attention layer image keys and values beside the
text's: out = to_out(Attn(q, k, v) + scale * Attn(q, to_k_ip(T), to_v_ip(T))) for the image
tokens T of a reference image. `to_out` is affine, so that layer differs from the model's own
(the prior) by to_out's matrix times the image attention: exactly a personal expert whose
difference from the prior is `to_out.weight @ Attn(q, k_ip, v_ip)`. Where the router gives a pixel
weight 0 the layer is the prior bit for bit. Self-attention stays the prior.

The files (safetensors with flat keys `image_proj.*` and `ip_adapter.<n>.to_{k,v}_ip.weight`) carry
no metadata, so what a file is comes from its keys and shapes, as every loader of them reads it:
`latents` makes a Resampler (plus, plus-face), `proj.3.weight` a per-token MLP (full-face),
`proj.weight` + `norm.weight` a linear projection (sd15, light_v11). Layer `n` (odd: the
cross-attention layers in diffusers' processor order) is the model's (n - 1) / 2-th cross-attention
layer counted over the down blocks, then the up blocks, then the middle block.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import WeightsFormatError
from .image_projection import LinearProjection, Resampler, TokenMLP, linear_tokens, resampler_shape

LINEAR, PLUS, FULL_FACE = "linear", "plus", "full-face"
IMAGE_EMBEDS, HIDDEN_STATES = "image_embeds", "penultimate_hidden_states"
FAMILY_OF_CONTEXT = {768: "sd15", 2048: "sdxl"}
ENCODERS = {  # (output, width) -> the CLIP vision model that gives it
    (IMAGE_EMBEDS, 768): "CLIP ViT-L/14",
    (IMAGE_EMBEDS, 1024): "CLIP ViT-H/14",
    (IMAGE_EMBEDS, 1280): "CLIP ViT-bigG/14",
    (HIDDEN_STATES, 1024): "CLIP ViT-L/14",
    (HIDDEN_STATES, 1280): "CLIP ViT-H/14",
    (HIDDEN_STATES, 1664): "CLIP ViT-bigG/14",
}

# Weights per transformer, by family and ComfyUI's transformer_index (SpatialTransformers counted in
# execution order: SD1.5's input 1, 2, 4, 5, 7, 8 are 0-5, the middle 6, output 3-11 are 7-15; SDXL's
# input 4, 5, 7, 8 are 0-3, the middle 4, output 0-5 are 5-10), named and placed as ComfyUI_IPAdapter_plus
# places them so its users find the ones they know. SDXL's are InstantStyle's blocks: style in
# up_blocks.0.attentions.1 (output 1), composition in down_blocks.2.attentions.1 (input 8). A
# transformer's weight holds for every one of its layers (SDXL's have 2 or 10).
WEIGHT_PRESETS: dict[str, dict[str, dict[int, float]] | None] = {
    "linear": None,  # every layer at the weight
    "style transfer": {"sd15": dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), 1.0), "sdxl": {6: 1.0}},
    "composition": {"sd15": {4: 0.25, 5: 1.0}, "sdxl": {3: 1.0}},
}
PRESET_TRANSFORMERS = {"sd15": 16, "sdxl": 11}  # the transformers the presets are defined on


@dataclass(frozen=True)
class IPAdapterSpec:
    """What an IP-Adapter file is, read from its keys and shapes."""

    kind: str  # LINEAR, PLUS or FULL_FACE
    family: str  # "sd15" or "sdxl": from the text width of its image keys
    context_dim: int  # the text (and image token) width
    encoder_output: str  # the CLIP-vision output it reads: IMAGE_EMBEDS or HIDDEN_STATES
    encoder_dim: int  # that output's width
    tokens: int  # image tokens per subject
    layer_dims: tuple[int, ...]  # inner width of each cross-attention layer, in file order

    @property
    def encoder_name(self) -> str:
        return encoder_name(self.encoder_output, self.encoder_dim)


class IPLayer(nn.Module):
    """One cross-attention layer's image key and value projections."""

    def __init__(self, context_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)


class IPAdapter(nn.Module):
    """An IP-Adapter's image projection and per-layer image key/value projections.

    `state_dict()` has the file's own keys (`image_proj.*`, `ip_adapter.<n>.to_k_ip.weight`)."""

    def __init__(self, spec: IPAdapterSpec, image_proj: nn.Module, layer_keys: Sequence[str]) -> None:
        super().__init__()
        self.spec = spec
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleDict(
            {key: IPLayer(spec.context_dim, dim) for key, dim in zip(layer_keys, spec.layer_dims, strict=True)}
        )

    @property
    def layers(self) -> list[IPLayer]:
        """The layers in file order: the i-th is the model's i-th cross-attention layer (see module doc)."""
        return list(self.ip_adapter.values())

    def image_tokens(self, clip_output: torch.Tensor) -> torch.Tensor:
        """The CLIP-vision output of the spec ([b, e] image embeds or [b, 257, e] hidden states) -> [b, t, d]."""
        weight = next(self.image_proj.parameters())
        return self.image_proj(clip_output.to(weight))


def encoder_name(output: str, width: int) -> str:
    return ENCODERS.get((output, width), f"a CLIP vision model with {width}-d {output}")


def read_spec(state_dict: Mapping[str, torch.Tensor], input_name: str) -> tuple[IPAdapterSpec, list[str]]:
    """The spec of an IP-Adapter state dict with the file's flat keys, and its layer keys in order."""
    proj = {k[len("image_proj.") :]: v for k, v in state_dict.items() if k.startswith("image_proj.")}
    layers = {k[len("ip_adapter.") :]: v for k, v in state_dict.items() if k.startswith("ip_adapter.")}
    if any(".to_q_lora." in key or "lora" in key for key in layers):
        raise WeightsFormatError(
            f"{input_name}: this is a FaceID IP-Adapter (it holds LoRA layers and reads InsightFace embeddings); "
            "MoA takes the CLIP-vision IP-Adapters: ip-adapter_sd15, light_v11, plus, plus-face or full-face"
        )
    keys = sorted({k.split(".")[0] for k in layers if k.split(".")[0].isdigit()}, key=int)
    if not proj or not keys or any(f"{key}.to_k_ip.weight" not in layers for key in keys):
        raise WeightsFormatError(
            f"{input_name}: this file is not an IP-Adapter (no image_proj.* and ip_adapter.<n>.to_k_ip.weight "
            "keys); pick an IP-Adapter file such as ip-adapter-plus-face_sd15.safetensors"
        )
    context_dim = layers[f"{keys[0]}.to_k_ip.weight"].shape[1]
    family = FAMILY_OF_CONTEXT.get(context_dim, f"an unknown model family ({context_dim}-d text)")
    if "latents" in proj:
        shape = resampler_shape(proj)
        kind, output, width, tokens = PLUS, HIDDEN_STATES, shape["embed_dim"], shape["tokens"]
    elif "proj.3.weight" in proj:
        kind, output, width, tokens = FULL_FACE, HIDDEN_STATES, proj["proj.0.weight"].shape[1], 257
    elif "proj.weight" in proj and "norm.weight" in proj:
        kind, output, width, tokens = LINEAR, IMAGE_EMBEDS, proj["proj.weight"].shape[1], linear_tokens(proj)
    else:
        raise WeightsFormatError(
            f"{input_name}: this IP-Adapter's image projection ({sorted(proj)[:4]}...) is none MoA knows "
            "(linear, Resampler, full-face MLP); use ip-adapter_sd15, light_v11, plus, plus-face or full-face"
        )
    dims = tuple(layers[f"{key}.to_k_ip.weight"].shape[0] for key in keys)
    return IPAdapterSpec(kind, family, context_dim, output, width, tokens, dims), keys


def build_ipadapter(state_dict: Mapping[str, torch.Tensor], input_name: str) -> IPAdapter:
    """An IPAdapter module holding `state_dict` (flat file keys), checked to be complete."""
    spec, keys = read_spec(state_dict, input_name)
    proj = {k[len("image_proj.") :]: v for k, v in state_dict.items() if k.startswith("image_proj.")}
    if spec.kind == PLUS:
        image_proj = Resampler(**resampler_shape(proj))
    elif spec.kind == FULL_FACE:
        image_proj = TokenMLP(spec.encoder_dim, spec.context_dim)
    else:
        image_proj = LinearProjection(spec.encoder_dim, spec.context_dim, spec.tokens)
    adapter = IPAdapter(spec, image_proj, keys)
    wanted = adapter.state_dict()
    missing = sorted(set(wanted) - set(state_dict))
    wrong = [k for k in wanted if k in state_dict and state_dict[k].shape != wanted[k].shape]
    if missing or wrong:
        what = f"lacks {missing[:3]}" if missing else f"has {wrong[0]} of shape {list(state_dict[wrong[0]].shape)}"
        raise WeightsFormatError(
            f"{input_name}: this {spec.kind} IP-Adapter file is incomplete or damaged (it {what}); "
            "download the file again"
        )
    adapter.load_state_dict({k: state_dict[k] for k in wanted})
    return adapter.eval().requires_grad_(False)


def load_ipadapter(path: str | Path, input_name: str, convert_command: str) -> IPAdapter:
    """An IP-Adapter from a .safetensors file. Pickled files (.bin, .pt, .ckpt) are never opened:
    the error gives `convert_command` + the file, which writes a safetensors copy beside it."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsFormatError(
            f"{input_name}: {path.name} is a pickle file, which MoA never opens (it can run code). Convert it "
            f'once with: {convert_command} "{path}"  then pick {path.stem}.safetensors'
        )
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise WeightsFormatError(f"{input_name}: {path.name} cannot be read as safetensors ({error})") from error
    return build_ipadapter(state_dict, input_name)


def layer_weights(
    preset: str, weight: float, transformers: Sequence[int], family: str | None, input_name: str
) -> list[float]:
    """The weight of each cross-attention layer under `preset`, given each layer's transformer index."""
    if preset not in WEIGHT_PRESETS:
        raise WeightsFormatError(f"{input_name}: {preset!r} is not one of {sorted(WEIGHT_PRESETS)}")
    table = WEIGHT_PRESETS[preset]
    if table is None:
        return [weight] * len(transformers)
    count = len(set(transformers))
    if family not in table or count != PRESET_TRANSFORMERS[family]:
        raise WeightsFormatError(
            f"{input_name}: {preset!r} is defined on SD1.5's {PRESET_TRANSFORMERS['sd15']} and SDXL's "
            f"{PRESET_TRANSFORMERS['sdxl']} transformer blocks and this model has {count}; use 'linear'"
        )
    return [weight * table[family].get(i, 0.0) for i in transformers]
