"""MoA (Mixture-of-Attention, Wang et al., SIGGRAPH Asia 2024) in plain torch.

No ComfyUI imports here: the host glue lives in the pack's `nodes/host`.
"""

from .errors import ConditioningError, MoAError, WeightsFormatError, WeightsMismatchError
from .fuser import Fuser, FuserConfig
from .layer import Delta, MoALayer
from .mixture import PriorProjections, RouterMode, mix, moa_attention, personal_attention
from .probe import TrainingProbe
from .prompt import PersonalPrompt, SubjectTokens, personal_context, subject_attention, subject_tokens
from .record import RouterRecord
from .router import Router
from .unet_layout import FAMILY_BLOCKS, LayerSpec, block_key, block_path, family_layer_paths
from .weights import ImageEncoderSpec, MoAConfig, MoAWeights, load_weights, moa_init, read_config, save_weights

__all__ = [
    "FAMILY_BLOCKS",
    "ConditioningError",
    "Delta",
    "Fuser",
    "FuserConfig",
    "ImageEncoderSpec",
    "LayerSpec",
    "MoAConfig",
    "MoAError",
    "MoALayer",
    "MoAWeights",
    "PersonalPrompt",
    "PriorProjections",
    "Router",
    "RouterMode",
    "RouterRecord",
    "SubjectTokens",
    "TrainingProbe",
    "WeightsFormatError",
    "WeightsMismatchError",
    "block_key",
    "block_path",
    "family_layer_paths",
    "load_weights",
    "mix",
    "moa_attention",
    "moa_init",
    "personal_attention",
    "personal_context",
    "read_config",
    "save_weights",
    "subject_attention",
    "subject_tokens",
]
