"""MoA (Mixture-of-Attention, Wang et al., SIGGRAPH Asia 2024) in plain torch.

No ComfyUI imports here: the host glue lives in the pack's `nodes/host`.
"""

from .attention_router import AttentionRouterConfig, RouterRun
from .errors import (
    ConditioningError,
    ConfigError,
    DataError,
    MoAError,
    OptionsError,
    WeightsFormatError,
    WeightsMismatchError,
)
from .fuser import Fuser, FuserConfig
from .ipadapter import IPAdapter, IPAdapterSpec, load_ipadapter
from .layer import Delta, MoALayer
from .losses import masked_diffusion_loss, object_loss, prior_map, router_loss, router_subject_loss, v_weights
from .mixture import (
    Mixing,
    PriorProjections,
    RouterMode,
    image_attention_difference,
    mix,
    mix_differences,
    moa_attention,
    personal_attention,
)
from .probe import TrainingProbe
from .prompt import PersonalPrompt, SubjectTokens, fuse_subjects, personal_context, subject_attention, subject_tokens
from .record import RouterRecord
from .router import Router
from .unet_layout import FAMILY_BLOCKS, LayerSpec, block_key, block_path, family_layer_paths
from .weights import ImageEncoderSpec, MoAConfig, MoAWeights, load_weights, moa_init, read_config, save_weights

__all__ = [
    "FAMILY_BLOCKS",
    "AttentionRouterConfig",
    "ConditioningError",
    "ConfigError",
    "DataError",
    "Delta",
    "Fuser",
    "FuserConfig",
    "IPAdapter",
    "IPAdapterSpec",
    "ImageEncoderSpec",
    "LayerSpec",
    "Mixing",
    "MoAConfig",
    "MoAError",
    "MoALayer",
    "MoAWeights",
    "OptionsError",
    "PersonalPrompt",
    "PriorProjections",
    "Router",
    "RouterMode",
    "RouterRecord",
    "RouterRun",
    "SubjectTokens",
    "TrainingProbe",
    "WeightsFormatError",
    "WeightsMismatchError",
    "block_key",
    "block_path",
    "family_layer_paths",
    "fuse_subjects",
    "image_attention_difference",
    "load_ipadapter",
    "load_weights",
    "masked_diffusion_loss",
    "mix",
    "mix_differences",
    "moa_attention",
    "moa_init",
    "object_loss",
    "personal_attention",
    "personal_context",
    "prior_map",
    "read_config",
    "router_loss",
    "router_subject_loss",
    "save_weights",
    "subject_attention",
    "subject_tokens",
    "v_weights",
]
