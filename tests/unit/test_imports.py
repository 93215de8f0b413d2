import importlib.util
import subprocess
import sys
from pathlib import Path

import comfyui_moa.moa_core as moa_core
from comfyui_moa.moa_core.errors import ConditioningError, MoAError, WeightsFormatError, WeightsMismatchError

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import sys
import moa_pack
core = moa_pack.module("moa_core")
assert core.__name__ == "comfyui_moa.moa_core", core.__name__
comfy = sorted(m for m in sys.modules if m == "comfy" or m.startswith("comfy."))
assert not comfy, f"moa_core imported ComfyUI: {comfy}"
host = sorted(m for m in sys.modules if m.startswith("comfyui_moa.nodes"))
assert not host, f"moa_core imported the host glue: {host}"
print("ok")
"""


def test_moa_core_imports_without_comfyui():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_public_name_exists():
    missing = [name for name in moa_core.__all__ if not hasattr(moa_core, name)]
    assert not missing


def test_user_errors_are_value_errors_under_one_base():
    for error in (WeightsFormatError, WeightsMismatchError, ConditioningError):
        assert issubclass(error, MoAError)
    assert issubclass(MoAError, ValueError)


def test_the_top_level_init_imports_alone_as_pytest_imports_it_from_a_folder_named_comfyui_moa():
    """pytest imports a rootdir's __init__.py without its package when the folder's name is no
    Python name ("ComfyUI-MoA", the name users clone to): that must not fail every test."""
    spec = importlib.util.spec_from_file_location("__init__", REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web"
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI's import, as a package, registers the nodes
