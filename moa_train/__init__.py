"""The MoA trainer: `python -m moa_train --config cfg.toml` (docs/training.md).

It trains through the same patch the nodes use (nodes/host/patch.py), so the MoA maths has one
home. The pack is imported as the package `comfyui_moa` (moa_pack.py).
"""

import moa_pack

moa_pack.load()
