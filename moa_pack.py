"""Import this checkout as the package `comfyui_moa` from outside ComfyUI (tests, CLIs).

Inside ComfyUI the pack is imported as a package named after its folder, and its modules import
each other relatively; this gives scripts the same view without running the pack's `__init__`.
"""

import importlib
import sys
import types
from pathlib import Path

NAME = "comfyui_moa"
ROOT = Path(__file__).resolve().parent


def load() -> types.ModuleType:
    """The package `comfyui_moa` rooted at this checkout; its submodules import on demand."""
    package = sys.modules.get(NAME)
    if package is None:
        package = types.ModuleType(NAME)
        package.__path__ = [str(ROOT)]
        package.__file__ = str(ROOT / "__init__.py")
        sys.modules[NAME] = package
    return package


def module(name: str) -> types.ModuleType:
    """A submodule by its path in the pack, e.g. module("nodes.host.patch")."""
    load()
    return importlib.import_module(f"{NAME}.{name}")
