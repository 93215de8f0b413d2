"""Run ComfyUI workflows headless: UI-format workflow files through a ComfyUI server's HTTP API."""
