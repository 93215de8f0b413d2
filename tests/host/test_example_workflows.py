"""Tier 2: every example workflow uses nodes that exist, with inputs they have, and converts to a
complete API prompt."""

import json
from pathlib import Path

import pytest

from comfyui_moa.moa_runner.local import local_object_info
from comfyui_moa.moa_runner.workflow import input_specs, is_widget, ui_to_api, widget_slots

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def object_info():
    return local_object_info()


def test_there_are_the_examples_the_paper_shows_the_ip_adapter_ones_and_sdxl_ones():
    names = {path.stem for path in EXAMPLES}
    assert names == {
        "moa_one_subject",
        "moa_two_subjects",
        "moa_controlnet_pose",
        "moa_subject_morph",
        "moa_subject_swap_fixed_seed",
        "moa_ipadapter_two_people",
        "moa_ipadapter_controlnet_pose",
        "moa_sdxl_one_subject",
        "moa_sdxl_two_subjects",
        "moa_photo_new_person",
        "moa_ipadapter_photo_new_person",
        "moa_ipadapter_sdxl_two_people",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_nodes_and_inputs_exist_and_links_carry_the_right_types(path, object_info):
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in object_info, f"{path.name}: unknown node {node['type']}"
        specs = input_specs(object_info[node["type"]])
        sockets = {name: kind for name, kind, options in specs if not is_widget(kind, options)}
        for socket in node["inputs"]:
            assert socket["name"] in sockets, f"{path.name}: {node['type']} has no input {socket['name']}"
            assert socket["type"] == sockets[socket["name"]]
        slots = sum(widget_slots(n, k, o) for n, k, o in specs if is_widget(k, o))
        assert len(node["widgets_values"]) == slots, f"{path.name}: {node['type']} widget count"
    for _, source, slot, _, _, kind in workflow["links"]:
        assert object_info[nodes[source]["type"]]["output"][slot] == kind
    assert any(node["type"] == "MoARouterMasks" for node in nodes.values()), "every example shows the router masks"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_converts_to_an_api_prompt_with_every_required_input(path, object_info):
    prompt = ui_to_api(json.loads(path.read_text()), object_info)
    for node_id, node in prompt.items():
        required = object_info[node["class_type"]]["input"].get("required", {})
        missing = sorted(set(required) - set(node["inputs"]))
        assert not missing, f"{path.name}: node {node_id} ({node['class_type']}) lacks {missing}"
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                assert value[0] in prompt, f"{path.name}: node {node_id} links to a missing node"
