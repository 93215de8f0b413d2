"""The small world (issue 12): synthetic captioned scenes with ground truth (scenes.py, no comfy),
the prior trained on them in ComfyUI's own classes (models.py, train.py), its subject encoder
(encoder.py), the held-out judges (judges.py), building, caching and shipping (build.py).
CLI: `python -m moa_world --help` from the repository root. Outside ComfyUI the package is
`comfyui_moa.moa_world` (moa_pack.py); inside, the pack's nodes import it relatively (nodes/world.py),
so nothing here imports moa_pack."""
