import math

import pytest
import torch

from comfyui_moa.moa_core.fuser import Fuser, FuserConfig, timestep_features

B, P, TEXT, IMAGE = 2, 3, 6, 5


def config(timestep: bool = True, layer: bool = True, num_layers: int = 3) -> FuserConfig:
    return FuserConfig(TEXT, IMAGE, 8, timestep, layer, num_layers if layer else 0, 4)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, P, TEXT, generator=generator), torch.randn(P, IMAGE, generator=generator)


def trained(cfg: FuserConfig, seed: int = 0) -> Fuser:
    """A fuser with default (random) inner layers and a perturbed last layer."""
    torch.manual_seed(seed)
    fuser = Fuser(cfg)
    with torch.no_grad():
        fuser.fc3.weight.normal_()
        fuser.fc3.bias.normal_()
    return fuser


CONDITIONING = [(False, False), (True, False), (False, True), (True, True)]
T = torch.tensor([[10.0], [900.0]])


@pytest.mark.parametrize(("timestep", "layer"), CONDITIONING)
def test_untrained_fuser_returns_the_word_token_bit_for_bit(timestep, layer):
    torch.manual_seed(0)
    fuser = Fuser(config(timestep, layer))
    word, image = inputs()
    assert torch.equal(fuser(word, image, T, 1), word)


@pytest.mark.parametrize(("timestep", "layer"), CONDITIONING)
def test_trained_fuser_changes_the_token_and_depends_on_the_image(timestep, layer):
    fuser = trained(config(timestep, layer))
    word, image = inputs()
    out = fuser(word, image, T, 1)
    assert out.shape == word.shape
    assert not torch.allclose(out, word, atol=1e-3)
    other = image.clone()
    other[0] += 1.0  # only the first token's image changes
    changed = fuser(word, other, T, 1)
    assert not torch.allclose(changed[:, 0], out[:, 0], atol=1e-3)
    torch.testing.assert_close(changed[:, 1:], out[:, 1:], rtol=1e-6, atol=1e-6)


def test_timestep_conditioning_makes_the_token_depend_on_the_timestep():
    fuser = trained(config(timestep=True, layer=False))
    word, image = inputs()
    early, late = fuser(word, image, torch.tensor([900.0])), fuser(word, image, torch.tensor([10.0]))
    assert not torch.allclose(early, late, atol=1e-3)
    # one timestep per token: broadcast from a single value, or given per row and token
    per_token = torch.tensor([[900.0, 10.0, 900.0], [10.0, 10.0, 900.0]])
    mixed = fuser(word, image, per_token)
    for row in range(B):
        for token in range(P):
            expected = (early if per_token[row, token] == 900.0 else late)[row, token]
            torch.testing.assert_close(mixed[row, token], expected, rtol=1e-6, atol=1e-6)


def test_layer_conditioning_makes_the_token_depend_on_the_layer():
    fuser = trained(config(timestep=False, layer=True))
    word, image = inputs()
    outs = [fuser(word, image, layer=i) for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(outs[i], outs[j], atol=1e-3)


def test_without_conditioning_timestep_and_layer_are_ignored():
    fuser = trained(config(timestep=False, layer=False))
    word, image = inputs()
    assert torch.equal(fuser(word, image), fuser(word, image, torch.tensor([5.0, 5.0]), 2))


def test_missing_timestep_or_layer_raises():
    word, image = inputs()
    with pytest.raises(ValueError, match="timestep-conditioned"):
        Fuser(config(timestep=True, layer=False))(word, image)
    with pytest.raises(ValueError, match="layer-conditioned"):
        Fuser(config(timestep=False, layer=True))(word, image, T)


def test_layer_conditioning_without_layers_raises():
    with pytest.raises(ValueError, match="num_layers must be at least 1"):
        Fuser(FuserConfig(TEXT, IMAGE, 8, False, True, 0, 4))


def test_output_dtype_follows_the_word_token():
    fuser = trained(config())
    word, image = inputs()
    out = fuser(word.double(), image, T, 0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), fuser(word, image, T, 0), rtol=1e-5, atol=1e-5)


def test_timestep_features_are_cosines_then_sines_of_geometric_frequencies():
    t = torch.tensor([0.0, 1.0, 500.0])
    features = timestep_features(t, 8)
    expected = torch.tensor(
        [
            [math.cos(v * 10000 ** (-i / 4)) for i in range(4)] + [math.sin(v * 10000 ** (-i / 4)) for i in range(4)]
            for v in t.tolist()
        ]
    )
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_timestep_features_have_the_requested_width_for_odd_widths():
    assert timestep_features(torch.tensor([3.0, 7.0]), 5).shape == (2, 5)
