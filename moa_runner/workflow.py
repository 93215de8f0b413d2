"""UI-format workflows (what artists save and share) <-> API-format prompts (what /prompt takes).

The conversion reads each node's inputs from the server's own /object_info, so no workflow is kept
twice. It follows the frontend's rules: an input is a widget when its type is a value type or a
list of choices (unless `forceInput`); seeds carry a second "control after generate" value and
upload combos a second "upload" value; a widget converted to a socket takes its link instead.
Muted nodes are dropped, bypassed nodes pass their inputs through, Reroutes are followed, and
PrimitiveNodes give their value to the inputs they feed; Notes are ignored.
"""

from typing import Any

VALUE_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


class WorkflowError(ValueError):
    """A workflow file that cannot be converted; the message names the node and the fix."""


def input_specs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of every input of a node, required first, in the server's order."""
    specs = []
    for section in ("required", "optional"):
        entries = info.get("input", {}).get(section, {})
        order = info.get("input_order", {}).get(section, list(entries))
        for name in order:
            spec = entries[name]
            specs.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return specs


def is_widget(kind: Any, options: dict) -> bool:
    return (isinstance(kind, list) or kind in VALUE_TYPES) and not options.get("forceInput", False)


def widget_slots(name: str, kind: Any, options: dict) -> int:
    """How many entries of widgets_values an input takes."""
    if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 2
    if any(key.endswith("_upload") and value for key, value in options.items()):
        return 2
    return 1


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt of a UI-format workflow."""
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(
                f"node {node['id']} is a {node['type']}, which this ComfyUI does not have; install the pack "
                "that provides it (or remove the node)"
            )
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "inputs": _inputs(node, info, nodes, links),
            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]},
        }
    return prompt


def _inputs(node: dict, info: dict, nodes: dict, links: dict) -> dict:
    linked = {slot["name"]: slot.get("link") for slot in node.get("inputs", [])}
    values = node.get("widgets_values") or []
    if not isinstance(values, list):
        raise WorkflowError(f"node {node['id']} ({node['type']}) saves its widgets by name; re-save the workflow")
    position, inputs = 0, {}
    for name, kind, options in input_specs(info):
        if is_widget(kind, options):
            if position < len(values):
                inputs[name] = values[position]
            position += widget_slots(name, kind, options)
        if linked.get(name) is not None:
            source = _source(linked[name], nodes, links, kind)
            if source is None:
                inputs.pop(name, None)
            else:
                inputs[name] = source
    return inputs


def _source(link_id: int, nodes: dict, links: dict, kind: Any):
    """[node id, output slot] feeding a link, following Reroutes and bypassed nodes; a
    PrimitiveNode's value instead of a link; None for a link from a muted node."""
    while True:
        link = links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is missing from the workflow's links; the file is damaged")
        _, origin_id, origin_slot, *_ = link
        origin = nodes[origin_id]
        if origin["type"] == "PrimitiveNode":
            return (origin.get("widgets_values") or [None])[0]
        if origin["type"] == "Reroute" or origin.get("mode", 0) == BYPASSED:
            upstream = _passthrough(origin, kind)
            if upstream is None:
                return None
            link_id = upstream
            continue
        if origin.get("mode", 0) == MUTED:
            return None
        return [str(origin_id), origin_slot]


def _passthrough(node: dict, kind: Any) -> int | None:
    """The link into a Reroute, or into a bypassed node's first input of the same type."""
    for slot in node.get("inputs", []):
        if slot.get("link") is not None and (node["type"] == "Reroute" or slot.get("type") == kind):
            return slot["link"]
    return None
