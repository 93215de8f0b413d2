"""Tier 3: the pack in a running ComfyUI, driven through the HTTP API as the runner drives it."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from moa_pack import ROOT
from moa_testing.quick import QUICK_ARGS

EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
NODES = ["MoALoader", "MoAInsightFaceLoader", "MoASubject", "MoASubjectBlend", "MoAApply", "MoARouterMasks"]
ARTIFACTS = ROOT / "test-artifacts"


def load(path):
    return json.loads(path.read_text())


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def outputs(result, word: str) -> list:
    return [path for path in result.images if word in path.name]


def test_the_pack_imports_and_its_nodes_are_served(comfy_server):
    info = comfy_server.object_info()
    assert all(node in info for node in [*NODES, "MoAInitWeights"])
    log = comfy_server.tail(3000).splitlines()
    assert not [line for line in log if "IMPORT FAILED" in line and "ComfyUI-MoA" in line]
    assert any("seconds:" in line and "ComfyUI-MoA" in line for line in log), "no import time line for the pack"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_workflow_runs_and_shows_where_moa_painted(run_workflow, path):
    result = run_workflow(load(path))
    images = [p for p in result.images if "router" not in p.name]
    masks = outputs(result, "router_masks")
    grids = outputs(result, "router_layer_step_grid")
    assert images and masks and grids, [p.name for p in result.images]
    for image in images:
        picture = pixels(image)
        assert picture.shape == (256, 256, 3) and picture.max() > picture.min(), image.name
    for mask in masks:
        assert pixels(mask).shape == (256, 256, 3) and pixels(mask).std() > 0.005, f"{mask.name} is flat"
    for grid in grids:
        assert pixels(grid).std() > 0.01
    if "swap" in path.stem:
        first, second = (pixels(p) for p in images[:2])
        assert np.abs(first - second).max() > 0.02, "swapping the subject changed nothing"
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "server-workflow-seconds.txt", "a") as log:
        log.write(f"{path.stem}\t{result.seconds:.1f}\n")


def test_moa_changes_the_image_that_strength_zero_leaves_as_the_base_model_draws_it(run_workflow):
    workflow = load(ROOT / "example_workflows" / "moa_one_subject.json")
    with_moa = run_workflow(workflow)
    without = run_workflow(workflow, "MoAApply.strength=0")
    (a,), (b,) = ([p for p in r.images if "router" not in p.name] for r in (with_moa, without))
    assert np.abs(pixels(a) - pixels(b)).max() > 0.02


def test_a_bad_graph_gives_the_node_error_and_the_server_keeps_serving(run_workflow, base_directory):
    import torch
    from safetensors.torch import save_file

    from comfyui_moa.moa_runner.run import RunError

    workflow = load(ROOT / "example_workflows" / "moa_one_subject.json")
    with pytest.raises(RunError, match=r"MoAApply.*'dog' is not in the prompt; add it to the prompt"):
        run_workflow(workflow, 'MoAApply.subject_words="dog"')
    save_file(
        {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(base_directory / "models" / "moa" / "a_lora.safetensors")
    )
    with pytest.raises(RunError, match="MoALoader.*a_lora.safetensors is not an MoA weights file"):
        run_workflow(workflow, 'MoALoader.moa_name="a_lora.safetensors"')
    assert run_workflow(workflow).images


def runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moa_runner", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_the_runner_command_saves_every_image_of_a_workflow(comfy_server, tmp_path):
    done = runner(str(EXAMPLES[0]), "--server", comfy_server.url, "--out", str(tmp_path), *QUICK_ARGS)
    assert done.returncode == 0, done.stderr
    saved = sorted(tmp_path.glob("*.png"))
    assert saved and all(str(path) in done.stdout for path in saved)


def test_the_runner_says_which_files_are_missing_and_where_they_go(comfy_server, tmp_path):
    done = runner(
        "--server", comfy_server.url, "--out", str(tmp_path), "--set", 'MoALoader.moa_name="mine.safetensors"'
    )
    assert done.returncode == 1
    assert "models/moa/mine.safetensors" in done.stderr
    assert "models/insightface/models/antelopev2/*.onnx" in done.stderr


def test_the_runner_reports_the_failing_node(comfy_server, tmp_path):
    done = runner("--server", comfy_server.url, "--out", str(tmp_path), "--set", 'MoAApply.subject_words="dog"')
    assert done.returncode == 1
    assert "'dog' is not in the prompt" in done.stderr


def test_the_demo_runs_the_shipped_small_world_with_no_model_files(tmp_path):
    # as a newcomer runs it: the runner starts its own server from the host it finds
    done = runner("--demo", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    prior, moa, masks = (sorted(tmp_path.glob(f"*_{kind}_*.png")) for kind in ("prior", "moa", "router_masks"))
    assert len(prior) == len(moa) == len(masks) == 4
    assert (tmp_path / "prior_vs_moa.png").is_file()
    for prior_image, moa_image, mask_image in zip(prior, moa, masks, strict=True):
        assert np.abs(pixels(moa_image) - pixels(prior_image)).mean() > 0.02  # MoA painted something
        mask = pixels(mask_image).mean(-1)
        assert mask.max() - mask.min() > 0.5  # the router sent some pixels to each expert
