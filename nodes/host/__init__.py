"""ComfyUI glue: everything that imports comfy.*, imported lazily by the node functions."""
