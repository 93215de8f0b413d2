"""Tier 4: the pack in the real ComfyUI frontend: its nodes and example workflows load, a workflow
queued from the UI runs, and the router viewer shows and scrubs the run's masks.

MOA_DOC_IMAGES=1 also writes the README's screenshots to docs/images/.
"""

import io
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_moa.moa_core.render import overlay
from moa_pack import ROOT
from moa_testing.browser import EXTENSION_FILE, TIMEOUT_MS, missing_browser
from moa_testing.quick import QUICK

if missing_browser() and os.environ.get("MOA_REQUIRE_HOST") != "1":  # one line for the tier; CI fails instead
    pytest.skip(f"browser tier: {missing_browser()}", allow_module_level=True)

EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
VIEWER = ".moa-router-viewer"
MISSING_NODES_DIALOG = '[aria-labelledby="global-load-workflow-warning"]'
DOC_IMAGES = ROOT / "docs" / "images"


def quick_widgets() -> dict[str, dict]:
    """moa_testing.quick's overrides (2 euler steps at 256 px) as {node type: {widget: value}}."""
    widgets: dict[str, dict] = {}
    for override in QUICK:
        target, _, raw = override.partition("=")
        kind, _, name = target.partition(".")
        widgets.setdefault(kind, {})[name] = json.loads(raw)
    return widgets


def save_doc_image(comfy_page, name: str) -> None:
    """The page as a README picture, in 256 colours to stay small."""
    if os.environ.get("MOA_DOC_IMAGES") != "1":
        return
    DOC_IMAGES.mkdir(parents=True, exist_ok=True)
    shot = Image.open(io.BytesIO(comfy_page.page.screenshot())).convert("RGB")
    target = DOC_IMAGES / f"{name}.png"
    shot.quantize(colors=256, dither=Image.Dither.NONE).save(target, optimize=True)
    assert target.stat().st_size < 300_000, f"{target} is {target.stat().st_size} bytes"


def test_the_frontend_loads_and_registers_the_viewer_once_without_errors(comfy_page, comfy_server):
    assert comfy_page.page.locator("#graph-canvas").is_visible()
    names = comfy_page.evaluate("window.app.extensions.map(e => e.name)")
    assert names.count("MoA.RouterViewer") == 1
    served = [path for path in comfy_page.get_json("/extensions") if path.endswith(f"/{EXTENSION_FILE}")]
    assert len(served) == 1, f"web/ is served twice, so the extension loads twice: {served}"
    registered = comfy_page.evaluate("Object.keys(LiteGraph.registered_node_types)")
    assert {"MoALoader", "MoASubject", "MoAApply", "MoARouterMasks"} <= set(registered)
    assert comfy_page.our_errors() == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_workflow_opens_without_missing_nodes(comfy_page, path):
    workflow = json.loads(path.read_text())
    comfy_page.load(workflow)
    assert comfy_page.page.locator(MISSING_NODES_DIALOG).count() == 0, "the frontend says nodes are missing"
    types = comfy_page.evaluate("window.app.graph.nodes.map(n => n.type)")
    assert sorted(types) == sorted(node["type"] for node in workflow["nodes"])
    unknown = comfy_page.evaluate("types => types.filter(t => !(t in LiteGraph.registered_node_types))", types)
    assert unknown == []
    masks = comfy_page.node_ids("MoARouterMasks")
    with_viewer = comfy_page.evaluate(
        "ids => ids.filter(id => window.app.graph.getNodeById(id).widgets.some(w => w.name === 'router_viewer'))",
        masks,
    )
    assert masks and with_viewer == masks
    # The viewer is a view, not an input: saving the graph gives back the file's widget values
    serialized = comfy_page.evaluate("window.app.graph.serialize()")["nodes"]
    saved = {node["id"]: node.get("widgets_values") for node in serialized}
    assert all(saved[node["id"]] == node["widgets_values"] for node in workflow["nodes"] if node["id"] in masks)
    comfy_page.fit()
    comfy_page.screenshot(f"example-{path.stem}")
    if path.stem == "moa_one_subject":
        save_doc_image(comfy_page, "example_one_subject")
    assert comfy_page.our_errors() == []


@pytest.fixture(scope="module")
def finished_run(comfy_page):
    """The one-subject example at 256 px and 2 steps, queued with the Run button; the viewer's
    description as the server recorded it in the history."""
    comfy_page.load(json.loads((ROOT / "example_workflows" / "moa_one_subject.json").read_text()))
    comfy_page.set_widgets(quick_widgets())
    # in an object: evaluate_handle would wait for a promise it is handed back
    listening = comfy_page.page.evaluate_handle(
        """timeout => ({ finished: new Promise((resolve, reject) => {
             const api = window.comfyAPI.api.api
             api.addEventListener('execution_success', (e) => resolve({ ok: true, ...e.detail }))
             api.addEventListener('execution_error', (e) => resolve({ ok: false, ...e.detail }))
             setTimeout(() => reject(new Error(`no result within ${timeout} ms`)), timeout)
           }) })""",
        TIMEOUT_MS,
    )
    # the Run button: inside the queue-button group up to frontend 1.35, the element itself in 1.49
    comfy_page.page.locator('[data-testid="queue-button"] button, button[data-testid="queue-button"]').first.click()
    result = comfy_page.evaluate("listening => listening.finished", listening)
    assert result["ok"], f"{result.get('node_type')} failed: {result.get('exception_message')}"
    (node,) = comfy_page.node_ids("MoARouterMasks")
    history = comfy_page.get_json(f"/history/{result['prompt_id']}")[result["prompt_id"]]
    (description,) = history["outputs"][str(node)]["moa_router_viewer"]
    comfy_page.page.wait_for_function(
        "selector => document.querySelector(selector)?.dataset.draws", arg=VIEWER, timeout=60_000
    )
    return {"history": history, "description": description, "node": node}


def expected_view(comfy_page, description: dict, group: str, step: int) -> np.ndarray:
    """What the viewer should draw, computed here with moa_core.render from the served atlases."""
    atlas = torch.from_numpy(comfy_page.get_image(description["groups"][group])).float() / 255
    (th, tw), columns, (height, width) = description["tile"], description["columns"], description["size"]
    row, column = divmod(step, columns)  # image 0: tile k = step
    tile = atlas[row * th : (row + 1) * th, column * tw : (column + 1) * tw]
    r1 = F.interpolate(tile[None, None], size=(height, width), mode="bilinear", align_corners=False)[0]
    pictures = torch.from_numpy(comfy_page.get_image(description["pictures"])).float() / 255
    return (overlay(pictures[None, :height, :width], r1)[0] * 255).numpy()


def view_of(comfy_page) -> np.ndarray:
    return comfy_page.canvas_pixels(f"{VIEWER} canvas").astype(np.float32)


def redraw(comfy_page, change) -> None:
    """Make a change in the viewer's controls and wait until it has drawn it."""
    draws = comfy_page.page.locator(VIEWER).get_attribute("data-draws")
    change()
    comfy_page.page.wait_for_function(
        "([selector, draws]) => document.querySelector(selector).dataset.draws !== draws", arg=[VIEWER, draws]
    )


def test_a_workflow_queued_from_the_ui_runs_and_its_images_show_in_the_page(comfy_page, finished_run):
    assert finished_run["history"]["status"]["status_str"] == "success"
    comfy_page.fit()
    comfy_page.page.wait_for_function(
        """() => window.app.graph.nodes.filter(n => ['SaveImage', 'PreviewImage'].includes(n.type))
                 .every(n => n.imgs?.length && n.imgs.every(img => img.complete && img.naturalWidth > 0))"""
    )
    sizes = comfy_page.evaluate(
        "window.app.graph.nodes.filter(n => n.type === 'SaveImage').map(n => n.imgs.map(i => i.naturalWidth))"
    )
    assert sizes == [[256]], "the generated image is not the 256 px one the UI asked for"
    comfy_page.screenshot("run-one-subject")
    assert comfy_page.our_errors() == []


def test_the_viewer_shows_where_the_personal_expert_painted_over_the_image(comfy_page, finished_run):
    description = finished_run["description"]
    assert (description["steps"], description["size"], description["group"]) == (2, [256, 256], "cross-attention")
    comfy_page.fit([finished_run["node"]])
    shown = view_of(comfy_page)
    assert shown.shape == (256, 256, 3) and shown.std() > 5, "the viewer's canvas is flat"
    label = comfy_page.page.locator(VIEWER).inner_text()
    assert "step 2/2" in label and "personal" in label
    # the last step of the node's own group, coloured as moa_core.render colours: within 8-bit rounding
    # and the browser's bilinear upscaling of the 32 px tile
    expected = expected_view(comfy_page, description, "cross-attention", step=1)
    assert np.abs(shown - expected).mean() < 2.0
    kinds = ("VAEDecode", "SaveImage", "MoARouterMasks", "PreviewImage")
    comfy_page.fit([node for kind in kinds for node in comfy_page.node_ids(kind)])  # the run's right-hand side
    comfy_page.screenshot("viewer-last-step")
    save_doc_image(comfy_page, "router_viewer")


def test_the_step_slider_shows_another_steps_masks(comfy_page, finished_run):
    comfy_page.fit([finished_run["node"]])
    before = view_of(comfy_page)
    redraw(comfy_page, lambda: comfy_page.page.locator(f"{VIEWER} input[type=range]").fill("0"))
    after = view_of(comfy_page)
    assert np.abs(after - before).mean() > 1.0, "moving the step slider did not change the picture"
    assert "step 1/2" in comfy_page.page.locator(VIEWER).inner_text()
    expected = expected_view(comfy_page, finished_run["description"], "cross-attention", step=0)
    assert np.abs(after - expected).mean() < 2.0
    comfy_page.screenshot("viewer-first-step")


def test_the_layer_group_choice_shows_that_groups_masks(comfy_page, finished_run):
    comfy_page.fit([finished_run["node"]])
    groups = comfy_page.page.locator(f"{VIEWER} select").first
    assert groups.locator("option").all_inner_texts() == list(finished_run["description"]["groups"])
    step = int(comfy_page.page.locator(f"{VIEWER} input[type=range]").input_value())
    before = view_of(comfy_page)
    redraw(comfy_page, lambda: groups.select_option("self-attention"))
    after = view_of(comfy_page)
    assert np.abs(after - before).mean() > 1.0, "choosing another layer group did not change the picture"
    expected = expected_view(comfy_page, finished_run["description"], "self-attention", step=step)
    assert np.abs(after - expected).mean() < 2.0
    comfy_page.screenshot("viewer-self-attention")
    assert comfy_page.our_errors() == []
