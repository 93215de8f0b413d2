"""Helpers of the browser tier (tests/browser): where Chromium is, how it starts, and ComfyPage,
the ComfyUI frontend in one Playwright page."""

import base64
import io
import json
import os
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from moa_pack import ROOT

CHROMIUM = Path(os.environ.get("MOA_CHROMIUM", "/usr/bin/chromium"))
# Headless as root in a sandbox with a closed network: without the background-networking flags
# Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
EXTENSION_FILE = "moa_router_viewer.js"
TIMEOUT_MS = 600_000  # a whole workflow on 2 busy CPU cores


def missing_browser() -> str | None:
    """Why this tier cannot run, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -r tests/requirements.txt)"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MOA_CHROMIUM)"
    return None


class ComfyPage:
    """The ComfyUI frontend in one browser page, and the errors it reported."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url, self.errors = page, url, []
        page.on("pageerror", lambda error: self.errors.append(f"{error}\n{error.stack}"))
        page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        # The frontend asks the internet for release notes and such; answer no at once
        page.route(lambda address: not address.startswith(url), lambda route: route.abort())

    def our_errors(self) -> list[str]:
        return [error for error in self.errors if EXTENSION_FILE in error or "MoA" in error]

    def evaluate(self, script: str, argument=None):
        return self.page.evaluate(script, argument)

    def load(self, workflow: dict) -> None:
        self.evaluate("workflow => window.app.loadGraphData(workflow)", workflow)
        self.page.wait_for_timeout(300)  # the dialog of missing nodes, if any, opens after the promise

    def node_ids(self, kind: str) -> list[int]:
        return self.evaluate("kind => window.app.graph.nodes.filter(n => n.type === kind).map(n => n.id)", kind)

    def set_widgets(self, values: dict[str, dict]) -> None:
        """{node type: {widget name: value}} on every node of that type, as a user's edits would."""
        self.evaluate(
            """values => { for (const node of window.app.graph.nodes)
                 for (const [name, value] of Object.entries(values[node.type] ?? {}))
                   node.widgets.find(w => w.name === name).value = value }""",
            values,
        )

    def fit(self, node_ids: list[int] | None = None) -> None:
        """Zoom the canvas onto these nodes (all, by default), as 'fit view' does."""
        self.evaluate(
            """ids => { const canvas = window.app.canvas
                 const boxes = window.app.graph.nodes.filter(n => !ids || ids.includes(n.id)).map(n => n.boundingRect)
                 const [x0, y0] = [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1]))]
                 const x1 = Math.max(...boxes.map(b => b[0] + b[2]))
                 const y1 = Math.max(...boxes.map(b => b[1] + b[3]))
                 canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.95 })
                 canvas.setDirty(true, true) }""",
            node_ids,
        )
        self.page.wait_for_timeout(500)  # DOM widgets follow the canvas on its next frames

    def screenshot(self, name: str, path: Path | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        target = path or ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(target))
        return target

    def canvas_pixels(self, selector: str) -> np.ndarray:
        """RGB [H, W, 3] uint8 of a <canvas> in the page, read back from the page itself."""
        data_url = self.page.eval_on_selector(selector, "canvas => canvas.toDataURL('image/png')")
        png = base64.b64decode(data_url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def get_json(self, route: str):
        with urllib.request.urlopen(f"{self.url}{route}", timeout=30) as response:
            return json.loads(response.read())

    def get_image(self, file: dict) -> np.ndarray:
        query = urllib.parse.urlencode({key: file[key] for key in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as response:
            return np.array(Image.open(io.BytesIO(response.read())))
