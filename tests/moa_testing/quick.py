"""Overrides that make any example workflow quick on a CPU: 2 euler steps at 256 px."""

QUICK = [
    "KSampler.steps=2",
    'KSampler.sampler_name="euler"',
    'KSampler.scheduler="normal"',
    "EmptyLatentImage.width=256",
    "EmptyLatentImage.height=256",
]
QUICK_ARGS = [arg for override in QUICK for arg in ("--set", override)]
