"""Find the attention layers of a ComfyUI UNet and check MoA weights against them."""

import comfy.supported_models
from comfy.ldm.modules.attention import BasicTransformerBlock, CrossAttention
from comfy.model_patcher import ModelPatcher
from torch import nn

from ...moa_core import LayerSpec, MoAWeights, WeightsMismatchError, block_key

_FAMILIES = (("sdxl", comfy.supported_models.SDXL), ("sd15", comfy.supported_models.SD15))


def model_family(model: ModelPatcher) -> str | None:
    """ "sd15", "sdxl", or None for models MoA does not support."""
    config = getattr(model.model, "model_config", None)
    for family, cls in _FAMILIES:
        if isinstance(config, cls):
            return family
    return None


def attention_modules(unet: nn.Module) -> dict[str, CrossAttention]:
    """UNet path -> attention module, for attn1 and attn2 of every spatial transformer block."""
    modules = {}
    for name, module in unet.named_modules():
        if not isinstance(module, BasicTransformerBlock):
            continue
        try:
            block_key(name)
        except ValueError:  # a transformer block outside the UNet's spatial transformers
            continue
        modules[f"{name}.attn1"] = module.attn1
        if module.attn2 is not None:
            modules[f"{name}.attn2"] = module.attn2
    return modules


def layer_specs(unet: nn.Module) -> list[LayerSpec]:
    """The shapes of every attention layer, in UNet order (what "MoA init" builds weights for)."""
    return [
        LayerSpec(path, attn.to_q.in_features, attn.to_k.in_features, attn.to_q.out_features)
        for path, attn in attention_modules(unet).items()
    ]


def check_weights_fit(model: ModelPatcher, weights: MoAWeights, input_name: str) -> None:
    """WeightsMismatchError unless `weights` were made for this model's family and layers."""
    family = model_family(model)
    if family is None:
        found = type(getattr(model.model, "model_config", model.model)).__name__
        raise WeightsMismatchError(
            f"{input_name}: MoA supports SD1.5 and SDXL models, this one is {found}; load an SD1.5 checkpoint"
        )
    config = weights.config
    if config.family != family:
        raise WeightsMismatchError(
            f"{input_name}: the MoA weights are for {config.family} models but the model is {family}; "
            f"load MoA weights made for {family}"
        )
    ours = {spec.path: spec for spec in layer_specs(model.model.diffusion_model)}
    for spec in config.layers:
        found = ours.get(spec.path)
        if found != spec:
            what = "has no such layer" if found is None else f"has it with shapes {found}"
            raise WeightsMismatchError(
                f"{input_name}: the MoA weights were made for a model with other attention layers ({spec} — the model "
                f"{what}); use MoA weights made for this model's architecture"
            )
