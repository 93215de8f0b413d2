"""Import this checkout as the package `comfyui_moa` from outside ComfyUI (tests, CLIs).

Inside ComfyUI the pack is imported as a package named after its folder, and its modules import
each other relatively; this gives scripts the same view without running the pack's `__init__`.
"""

import importlib
import os
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


def find_host() -> Path | None:
    """The ComfyUI checkout to run against: COMFYUI_PATH, else the ComfyUI this pack sits in
    (custom_nodes/<pack>), else ~/ComfyUI."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if ROOT.parent.name == "custom_nodes":
        candidates.append(ROOT.parent.parent)
    candidates.append(Path.home() / "ComfyUI")
    for path in candidates:
        if (path / "main.py").is_file() and (path / "comfy").is_dir():
            return path.resolve()
    return None


def use_host(cpu: bool) -> Path:
    """Make the ComfyUI host importable (and, with `cpu`, keep it off any GPU); ValueError if none."""
    host = find_host()
    if host is None:
        raise ValueError("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (see README.md)")
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    if cpu:
        import comfy.cli_args

        # before comfy.model_management is first imported, or the CUDA build of torch looks for a GPU
        comfy.cli_args.args.cpu = True
    return host
