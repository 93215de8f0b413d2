"""The small world (issue 12): synthetic captioned scenes with ground truth (scenes.py, no comfy),
the prior trained on them in ComfyUI's own classes (models.py, train.py), the held-out judges
(judges.py) and the subject encoder (encoder.py). CLI: `python -m moa_world --help` from the
repository root; the package is `comfyui_moa.moa_world` (moa_pack.py)."""

import moa_pack

moa_pack.load()
