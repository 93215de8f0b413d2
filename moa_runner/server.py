"""A ComfyUI server to run workflows on: one that already runs, or one started for the run."""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_NODE = "MoAApply"  # present in /object_info once the pack imported


class ServerError(RuntimeError):
    """The server could not be reached or started, or the pack did not load in it."""


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        get_json(f"{url}/system_stats", timeout=2.0)
        return True
    except (OSError, ValueError):
        return False


class ComfyServer:
    """`with ComfyServer.start(...) as server:` runs main.py until the block ends."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
        self.url, self.process, self.log = url, process, log

    @classmethod
    def connect(cls, url: str) -> "ComfyServer":
        if not answers(url):
            raise ServerError(f"no ComfyUI server answers at {url}")
        return cls(url)

    @classmethod
    def start(cls, comfyui: Path, pack: Path, port: int, extra_args: list[str], timeout: float = 180.0):
        """Start `comfyui`/main.py on 127.0.0.1:port with this pack among its custom nodes."""
        work = Path(tempfile.mkdtemp(prefix="moa-runner-"))
        args = [sys.executable, str(comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(port)]
        args += ["--disable-auto-launch", *extra_args]
        if pack.parent.name != "custom_nodes" or pack.parent.parent.resolve() != comfyui.resolve():
            # the pack is not installed in this ComfyUI: offer it from a folder of its own
            (work / "custom_nodes").mkdir()
            (work / "custom_nodes" / "ComfyUI-MoA").symlink_to(pack, target_is_directory=True)
            config = work / "extra_model_paths.yaml"
            config.write_text(f"moa_runner:\n    custom_nodes: {work / 'custom_nodes'}\n")
            args += ["--extra-model-paths-config", str(config)]
        log = work / "comfyui.log"
        with open(log, "w") as out:
            process = subprocess.Popen(args, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        server = cls(f"http://127.0.0.1:{port}", process, log)
        server._wait(timeout)
        return server

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited while starting (code {self.process.returncode}):\n{self.tail()}")
            if answers(self.url):
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.tail()}")

    def check_pack(self) -> None:
        """ServerError unless this pack's nodes are in /object_info (ComfyUI keeps serving without them)."""
        try:
            info = get_json(f"{self.url}/object_info/{PACK_NODE}")
        except (OSError, ValueError) as e:
            raise ServerError(f"cannot read {self.url}/object_info: {e}") from None
        if PACK_NODE not in info:
            failed = [line for line in self.tail(400).splitlines() if "IMPORT FAILED" in line or "Error" in line]
            raise ServerError("the MoA nodes did not load in ComfyUI. " + ("\n".join(failed[-10:]) or self.tail()))

    def object_info(self) -> dict:
        return get_json(f"{self.url}/object_info", timeout=60)

    def tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def post_json(url: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
