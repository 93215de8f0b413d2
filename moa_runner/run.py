"""Queue an API-format prompt on a ComfyUI server, follow it, and save every image it outputs."""

import asyncio
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tqdm import tqdm

from .server import post_json

# Inputs that name files in a model folder: where a missing one goes.
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "models/checkpoints",
    ("CLIPVisionLoader", "clip_name"): "models/clip_vision",
    ("ControlNetLoader", "control_net_name"): "models/controlnet",
    ("LoraLoader", "lora_name"): "models/loras",
    ("MoALoader", "moa_name"): "models/moa",
    ("LoadImage", "image"): "input (or pass --image NAME=PATH)",
}


class RunError(RuntimeError):
    """The workflow failed; the message is the node's error."""


@dataclass(frozen=True)
class RunResult:
    prompt_id: str
    images: list[Path]
    seconds: float


def missing_files(prompt: dict, object_info: dict) -> list[str]:
    """A line per file the prompt names that the server does not have, with the folder it goes in."""
    lines = []
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            folder = MODEL_INPUTS.get((node["class_type"], name))
            choices = object_info[node["class_type"]]["input"].get("required", {}).get(name, [None])[0]
            if folder and isinstance(value, str) and isinstance(choices, list) and value not in choices:
                lines.append(f"{folder}/{value}  (node {node_id}, {node['class_type']}.{name})")
    if lines:  # folders /object_info cannot vouch for: name them too, so one round of fetching does
        lines += [
            f"models/insightface/models/{node['inputs'].get('model_pack')}/*.onnx  (node {node_id}, checked at run)"
            for node_id, node in prompt.items()
            if node["class_type"] == "MoAInsightFaceLoader"
        ]
    return lines


def apply_overrides(prompt: dict, overrides: list[str]) -> None:
    """'KSampler.steps=4' (node id, title or type, then input) sets that input on every match."""
    for override in overrides:
        target, _, raw = override.partition("=")
        node_key, _, input_name = target.rpartition(".")
        if not node_key or not input_name or not raw:
            raise RunError(f"--set {override!r}: write NODE.INPUT=VALUE, e.g. KSampler.steps=4")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        matches = [
            node
            for node_id, node in prompt.items()
            if node_key in (node_id, node["class_type"], node.get("_meta", {}).get("title"))
        ]
        if not matches:
            raise RunError(f"--set {override!r}: no node with id, title or type {node_key!r} in the workflow")
        for node in matches:
            node["inputs"][input_name] = value


async def upload_image(url: str, name: str, path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        form = aiohttp.FormData()
        form.add_field("image", path.read_bytes(), filename=name)
        form.add_field("overwrite", "true")
        async with session.post(f"{url}/upload/image", data=form) as response:
            if response.status != 200:
                raise RunError(f"uploading {path} as {name} failed: HTTP {response.status}")


async def run_prompt(url: str, prompt: dict, out_dir: Path, timeout: float = 3600.0) -> RunResult:
    """Queue `prompt`, show progress, save its images to `out_dir`; RunError with the node's message."""
    client_id = uuid.uuid4().hex
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
            status, answer = post_json(f"{url}/prompt", {"prompt": prompt, "client_id": client_id})
            if status != 200:
                raise RunError(describe_rejection(answer, prompt))
            prompt_id = answer["prompt_id"]
            await asyncio.wait_for(_follow(ws, prompt_id, prompt), timeout)
        async with session.get(f"{url}/history/{prompt_id}") as response:
            history = (await response.json())[prompt_id]
        images = await _download(session, url, history.get("outputs", {}), prompt, out_dir)
    return RunResult(prompt_id, images, time.monotonic() - started)


def describe_rejection(answer: dict, prompt: dict) -> str:
    lines = [answer.get("error", {}).get("message", "the server refused the prompt")]
    for node_id, problem in answer.get("node_errors", {}).items():
        for error in problem.get("errors", []):
            where = f"node {node_id} ({problem.get('class_type')})"
            lines.append(f"  {where}: {error.get('message')}: {error.get('details')}")
    return "\n".join(lines)


async def _follow(ws, prompt_id: str, prompt: dict) -> None:
    bar = tqdm(total=len(prompt), unit="node", desc="queued")
    try:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(message.data)
            kind, data = event.get("type"), event.get("data", {})
            if data.get("prompt_id", prompt_id) != prompt_id:
                continue
            if kind == "executing" and data.get("node") is not None:
                bar.update(1)
                bar.set_description(prompt.get(data["node"], {}).get("class_type", data["node"]))
            elif kind == "execution_cached":
                bar.update(len(data.get("nodes", [])))
            elif kind == "progress":
                bar.set_postfix_str(f"{data['value']}/{data['max']}")
            elif kind == "execution_error":
                raise RunError(
                    f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_message')}"
                )
            elif kind == "execution_interrupted":
                raise RunError("the run was interrupted on the server")
            elif kind == "executing" and data.get("node") is None:
                return  # sent after the run is in /history (execution_success comes before)
    finally:
        bar.close()


async def _download(session, url: str, outputs: dict, prompt: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for node_id, output in outputs.items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title", node_id)
        slug = "".join(c if c.isalnum() else "_" for c in title).strip("_").lower()
        for i, image in enumerate(output.get("images", [])):
            query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
            async with session.get(f"{url}/view?{query}") as response:
                target = out_dir / f"{node_id}_{slug}_{i:02d}.png"
                target.write_bytes(await response.read())
                saved.append(target)
    return saved


def stack_rows(images: list[Path], target: Path) -> Path:
    """The demo's grid: its prior, MoA and router-mask images (by output title), one row each,
    the images of a batch side by side."""
    from PIL import Image

    rows = []
    for word in ("prior", "moa_", "router_masks"):
        row = [Image.open(path).convert("RGB") for path in images if word in path.name]
        if row:
            rows.append(row)
    width = max(sum(im.width for im in row) for row in rows)
    height = sum(max(im.height for im in row) for row in rows)
    grid = Image.new("RGB", (width, height), "white")
    top = 0
    for row in rows:
        left = 0
        for im in row:
            grid.paste(im, (left, top))
            left += im.width
        top += max(im.height for im in row)
    grid.save(target)
    return target
