import torch
import torch.nn.functional as F

from comfyui_moa.moa_core import render
from comfyui_moa.moa_core.render import colormap, grid, heatmap, overlay, resize_maps

ANCHORS, COLOURS = render._ANCHORS, render._COLOURS


def maps(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_colormap_ends_are_the_first_and_last_anchor_colours():
    assert torch.equal(colormap(torch.tensor(0.0)), COLOURS[0])
    assert torch.equal(colormap(torch.tensor(1.0)), COLOURS[-1])
    assert torch.equal(colormap(torch.tensor([-3.0, 7.0])), COLOURS[[0, -1]])  # clamped


def test_colormap_is_piecewise_linear_between_the_anchors():
    midpoints = (ANCHORS[:-1] + ANCHORS[1:]) / 2
    torch.testing.assert_close(colormap(ANCHORS), COLOURS, rtol=0, atol=1e-6)
    torch.testing.assert_close(colormap(midpoints), (COLOURS[:-1] + COLOURS[1:]) / 2, rtol=0, atol=1e-6)


def test_colormap_keeps_the_shape_and_stays_in_the_unit_cube():
    values = maps(2, 3, 4) * 1.4 - 0.2
    out = colormap(values.double())
    assert out.shape == (2, 3, 4, 3) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_heatmap_is_the_colormap_of_the_resized_maps():
    m = maps(2, 4, 4)
    assert heatmap(m).shape == (2, 4, 4, 3)
    assert torch.equal(heatmap(m), colormap(m))
    big = heatmap(m, (8, 12))
    assert big.shape == (2, 8, 12, 3)
    expected = F.interpolate(m[:, None], size=(8, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(big, colormap(expected), rtol=0, atol=1e-6)
    assert torch.equal(resize_maps(m.half(), (4, 4)), m.half().float())


def test_overlay_of_zero_maps_or_zero_alpha_is_the_image_bit_for_bit():
    image = maps(2, 8, 8, 3)
    assert torch.equal(overlay(image, torch.zeros(2, 4, 4)), image)
    assert torch.equal(overlay(image, maps(2, 4, 4, seed=1), alpha=0.0), image)


def test_overlay_paints_where_the_map_is_one_and_only_there():
    image = maps(1, 4, 4, 3)
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1.0
    out = overlay(image, m, alpha=0.6)
    torch.testing.assert_close(out[0, :2, :2], 0.4 * image[0, :2, :2] + 0.6 * COLOURS[-1], rtol=0, atol=1e-6)
    assert torch.equal(out[0, 2:], image[0, 2:])
    assert torch.equal(out[0, :, 2:], image[0, :, 2:])


def test_one_map_overlays_every_image_of_a_batch():
    image = maps(3, 4, 4, 3)
    m = maps(1, 4, 4, seed=2)
    out = overlay(image, m)
    for i in range(3):
        assert torch.equal(out[i], overlay(image[i : i + 1], m)[0])


def test_grid_lays_out_tiles_with_white_gaps():
    m = maps(2, 3, 5, 5)
    tile, gap = 8, 2
    out = grid(m, tile=tile, gap=gap)
    assert out.shape == (1, 2 * (tile + gap) - gap, 3 * (tile + gap) - gap, 3)
    step = tile + gap
    for i in range(2):
        for j in range(3):
            expected = heatmap(m[i, j][None], (tile, tile))[0]
            assert torch.equal(out[0, i * step : i * step + tile, j * step : j * step + tile], expected)
    assert torch.equal(out[0, tile:step], torch.ones(gap, out.shape[2], 3))
    for j in (1, 2):
        assert torch.equal(out[0, :, j * step - gap : j * step], torch.ones(out.shape[1], gap, 3))


def test_colormap_stops_are_the_colormaps_own_anchors_as_json_ready_lists():
    import json

    stops = json.loads(json.dumps(render.colormap_stops()))
    assert stops["alpha"] == render.OVERLAY_ALPHA
    for anchor, colour in zip(stops["anchors"], stops["colours"], strict=True):
        torch.testing.assert_close(colormap(torch.tensor(anchor)), torch.tensor(colour), rtol=0, atol=1e-6)
