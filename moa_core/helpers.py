"""Tiny shared helpers."""

import math

import torch


def like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` on the device and in the dtype of `reference`; no copy when it already is.

    MoA weights may sit on another device than the activations (low-VRAM offload) or be stored in
    another dtype than the UNet computes in, so every weight is matched at call time.
    """
    if tensor.device == reference.device and tensor.dtype == reference.dtype:
        return tensor
    return tensor.to(device=reference.device, dtype=reference.dtype)


def seq_to_hw(seq_len: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid (h, w) of a UNet level with `seq_len` pixels, for a UNet input of `latent_hw`.

    Each UNet level halves the grid with a stride-2 convolution (odd sizes round up), so the level
    is found by halving until the pixel count matches.
    """
    h, w = latent_hw
    while h * w > seq_len and h * w > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != seq_len:
        raise ValueError(f"{seq_len} pixels is no UNet level of a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w
