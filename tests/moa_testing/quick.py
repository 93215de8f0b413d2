"""Overrides that make any example workflow quick on a CPU: 2 euler steps at 256 px (photos: 2 steps)."""

QUICK = [
    "KSampler.steps=2",
    'KSampler.sampler_name="euler"',
    'KSampler.scheduler="normal"',
    "EmptyLatentImage.width=256",
    "EmptyLatentImage.height=256",
]
QUICK_ARGS = [arg for override in QUICK for arg in ("--set", override)]
PHOTO_QUICK = ["MoAInvert.steps=2", "MoAInvert.refine=1"]


def quick_for(prompt: dict) -> list[str]:
    """The quick overrides for the node types an API prompt has."""
    kinds = {node["class_type"] for node in prompt.values()}
    return [override for override in QUICK + PHOTO_QUICK if override.split(".")[0] in kinds]
