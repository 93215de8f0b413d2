"""The pack's nodes: this table is the table of contents."""

from .apply import MoAApply
from .host import folders
from .init_weights import MoAInitWeights
from .inversion import MoAInvert, MoARegenerate
from .ipadapter import MoAIPAdapterApply, MoAIPAdapterLoader
from .loaders import MoAInsightFaceLoader, MoALoader
from .router_masks import MoARouterMasks
from .subjects import MoASubject, MoASubjectBlend
from .world import MoAWorldLoader

folders.register()

NODE_CLASS_MAPPINGS = {
    "MoALoader": MoALoader,
    "MoAInsightFaceLoader": MoAInsightFaceLoader,
    "MoASubject": MoASubject,
    "MoASubjectBlend": MoASubjectBlend,
    "MoAApply": MoAApply,
    "MoARouterMasks": MoARouterMasks,
    "MoAInitWeights": MoAInitWeights,
    "MoAIPAdapterLoader": MoAIPAdapterLoader,
    "MoAIPAdapterApply": MoAIPAdapterApply,
    "MoAWorldLoader": MoAWorldLoader,
    "MoAInvert": MoAInvert,
    "MoARegenerate": MoARegenerate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MoALoader": "MoA Loader",
    "MoAInsightFaceLoader": "MoA InsightFace Loader",
    "MoASubject": "MoA Subject",
    "MoASubjectBlend": "MoA Subject Blend",
    "MoAApply": "MoA Apply",
    "MoARouterMasks": "MoA Router Masks",
    "MoAInitWeights": "MoA Init Weights",
    "MoAIPAdapterLoader": "MoA IP-Adapter Loader",
    "MoAIPAdapterApply": "MoA IP-Adapter Apply",
    "MoAWorldLoader": "MoA World Loader",
    "MoAInvert": "MoA Invert",
    "MoARegenerate": "MoA Regenerate",
}
