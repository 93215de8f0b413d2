"""Helpers shared by the test tiers: tiny models in ComfyUI's own classes, sampling, weights."""
