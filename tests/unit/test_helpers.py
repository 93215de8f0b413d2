import multiprocessing

import pytest
import torch

from comfyui_moa.moa_core.helpers import like, seq_to_hw

LEVELS = {
    (64, 64): [(64, 64), (32, 32), (16, 16), (8, 8)],
    (9, 13): [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)],
    (128, 72): [(128, 72), (64, 36), (32, 18), (16, 9)],
    (17, 17): [(17, 17), (9, 9), (5, 5), (3, 3)],
}


@pytest.mark.parametrize("latent", list(LEVELS))
def test_seq_to_hw_finds_every_level_of_even_and_odd_latents(latent):
    for h, w in LEVELS[latent]:  # odd sizes round up at each stride-2 level (worked out by hand)
        assert seq_to_hw(h * w, latent) == (h, w)


@pytest.mark.parametrize("seq_len", [100, 64 * 64 + 1, 33 * 32])
def test_seq_to_hw_rejects_a_length_that_is_no_level(seq_len):
    with pytest.raises(ValueError, match=f"{seq_len} pixels is no UNet level of a 64x64 latent"):
        seq_to_hw(seq_len, (64, 64))


def _seq_to_hw_zero(queue) -> None:
    try:
        seq_to_hw(0, (8, 8))
        queue.put("returned")
    except ValueError:
        queue.put("ValueError")


def test_seq_to_hw_rejects_zero_pixels_instead_of_looping_forever():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_seq_to_hw_zero, args=(queue,))
    child.start()
    child.join(timeout=1.0)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "seq_to_hw(0, ...) never returns: 1x1 halves to 1x1 forever"
    assert queue.get(timeout=1.0) == "ValueError"


def test_like_returns_the_same_object_when_device_and_dtype_match():
    tensor = torch.randn(3, 4)
    assert like(tensor, torch.zeros(2)) is tensor


def test_like_converts_dtype_and_keeps_values():
    tensor = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    out = like(tensor, torch.zeros(1, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert torch.equal(out, tensor.double())


def test_like_moves_to_the_reference_device():
    out = like(torch.randn(2), torch.zeros(1, device="meta"))
    assert out.device.type == "meta"
    assert out.dtype == torch.float32
