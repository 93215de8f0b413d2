"""/object_info without a server: ComfyUI's core nodes and this pack's, read in-process."""

import json


def local_object_info() -> dict:
    """What /object_info would serve for the core nodes (nodes.py) and this pack (inputs, outputs).
    The ComfyUI host must be importable (moa_pack.use_host)."""
    import nodes as comfy_nodes

    from ..nodes import NODE_CLASS_MAPPINGS

    info = {}
    for name, cls in {**comfy_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}.items():
        info[name] = {
            "input": cls.INPUT_TYPES(),
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
        }
    return json.loads(json.dumps(info))  # as the server sends it: tuples become lists
