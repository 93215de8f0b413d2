import pytest

from comfyui_moa.moa_runner.workflow import WorkflowError, ui_to_api

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}}, "output": ["MODEL"]},
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "cfg": ["FLOAT", {"default": 7.0}],
            },
            "optional": {"note": ["STRING", {"forceInput": True}]},
        },
        "output": ["LATENT"],
    },
    "Image": {"input": {"required": {"image": [["x.png"], {"image_upload": True}], "gain": ["FLOAT", {}]}}},
    "Patch": {"input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {}]}}, "output": ["MODEL"]},
}


def node(node_id, kind, widgets=(), inputs=(), mode=0):
    sockets = [{"name": name, "type": t, "link": link} for name, t, link in inputs]
    return {"id": node_id, "type": kind, "mode": mode, "inputs": sockets, "widgets_values": list(widgets)}


def workflow(nodes, links):
    return {"nodes": nodes, "links": links}


def test_widgets_follow_the_input_order_and_skip_control_and_upload_values():
    prompt = ui_to_api(
        workflow(
            [
                node(1, "Loader", ["b.safetensors"]),
                node(2, "Sampler", [7, "fixed", 30, 5.5], [("model", "MODEL", 1)]),
                node(3, "Image", ["x.png", "image", 0.5]),
            ],
            [[1, 1, 0, 2, 0, "MODEL"]],
        ),
        INFO,
    )
    assert prompt["1"]["inputs"] == {"name": "b.safetensors"}
    assert prompt["2"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 30, "cfg": 5.5}
    assert prompt["3"]["inputs"] == {"image": "x.png", "gain": 0.5}
    assert prompt["2"]["class_type"] == "Sampler" and prompt["2"]["_meta"]["title"] == "Sampler"


def test_a_widget_converted_to_an_input_takes_its_link_or_a_primitive_value():
    nodes = [
        node(1, "Loader", ["a.safetensors"]),
        node(2, "PrimitiveNode", [99]),
        node(3, "Sampler", [1, "fixed", 20, 7.0], [("model", "MODEL", 1), ("seed", "INT", 2)]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 1, "INT"]]
    assert ui_to_api(workflow(nodes, links), INFO)["3"]["inputs"]["seed"] == 99
    assert "2" not in ui_to_api(workflow(nodes, links), INFO)


def test_bypassed_nodes_pass_their_input_through_and_reroutes_are_followed():
    nodes = [
        node(1, "Loader", ["a.safetensors"]),
        node(2, "Patch", [0.5], [("model", "MODEL", 1)], mode=4),
        node(3, "Reroute", [], [("", "*", 2)]),
        node(4, "Sampler", [1, "fixed", 20, 7.0], [("model", "MODEL", 3)]),
        node(5, "Note", ["just text"]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 3, 0, 4, 0, "MODEL"]]
    prompt = ui_to_api(workflow(nodes, links), INFO)
    assert set(prompt) == {"1", "4"}
    assert prompt["4"]["inputs"]["model"] == ["1", 0]


def test_inputs_from_muted_nodes_are_dropped_with_the_nodes():
    nodes = [
        node(1, "Loader", ["a.safetensors"], mode=2),
        node(2, "Sampler", [1, "fixed", 20, 7.0], [("model", "MODEL", 1)]),
    ]
    prompt = ui_to_api(workflow(nodes, [[1, 1, 0, 2, 0, "MODEL"]]), INFO)
    assert set(prompt) == {"2"} and "model" not in prompt["2"]["inputs"]


def test_an_unknown_node_type_names_the_node_and_the_fix():
    with pytest.raises(
        WorkflowError, match="node 7 is a FancyNode, which this ComfyUI does not have; install the pack"
    ):
        ui_to_api(workflow([node(7, "FancyNode")], []), INFO)


def test_a_damaged_link_table_is_reported():
    with pytest.raises(WorkflowError, match="link 5 is missing"):
        ui_to_api(workflow([node(1, "Sampler", [1, "fixed", 2, 3.0], [("model", "MODEL", 5)])], []), INFO)
