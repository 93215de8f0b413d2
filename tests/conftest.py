"""Test setup shared by every tier.

The pack is imported as the package `comfyui_moa` (see moa_pack.py). Tiers 2-4 need a ComfyUI
checkout: COMFYUI_PATH, else the ComfyUI this pack sits in (custom_nodes/<pack>), else ~/ComfyUI.
Without one, a plain run skips those tiers with one line; with MOA_REQUIRE_HOST=1 (as .ci/run sets)
the run fails instead.
"""

import os
from pathlib import Path

import pytest

import moa_pack

moa_pack.load()

REPO = moa_pack.ROOT
HOST_TIERS = ("host", "server", "browser", "train")

# Session fixtures writing test model files, and the headless ComfyUI server that tiers 3 and 4
# share (one per session); they import comfy or start anything only when used. pytest reads
# pytest_plugins from this top-level conftest only, not from tests/host/conftest.py.
pytest_plugins = ["moa_testing.fixtures", "moa_testing.server_fixtures"]

HOST = moa_pack.find_host()


def pytest_configure(config: pytest.Config) -> None:
    if HOST is None:
        if os.environ.get("MOA_REQUIRE_HOST") == "1":
            raise pytest.UsageError("MOA_REQUIRE_HOST=1 but no ComfyUI host was found (set COMFYUI_PATH)")
        return
    moa_pack.use_host(cpu=True)


def pytest_report_header(config: pytest.Config) -> str:
    if HOST is None:
        return "ComfyUI host: none found (COMFYUI_PATH, ../.., ~/ComfyUI): tiers 2-4 are skipped"
    return f"ComfyUI host: {HOST}"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if HOST is None and collection_path.is_relative_to(REPO / "tests") and collection_path.parts[-1] in HOST_TIERS:
        return True
    return None
