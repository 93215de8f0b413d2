"""ComfyUI-MoA: Mixture-of-Attention personalization for ComfyUI."""

WEB_DIRECTORY = "./web"

# ComfyUI imports the pack as a package. pytest, when the checkout's folder is no Python name (it
# is "ComfyUI-MoA"), imports this file on its own to look for module-level setup: then there is no
# package to import the nodes from, and none are needed.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
