import pytest
import torch

from comfyui_moa.moa_core.atlas import (
    acted_steps,
    atlas_columns,
    fit,
    group_step_maps,
    map_atlases,
    pack,
    picture_atlas,
    to_bytes,
)
from comfyui_moa.moa_core.record import RouterRecord

PATHS = [
    "input_blocks.1.1.transformer_blocks.0.attn1",
    "input_blocks.1.1.transformer_blocks.0.attn2",
    "output_blocks.3.1.transformer_blocks.0.attn2",
]
SIGMAS = [14.6, 7.0, 3.0, 0.0]


def recorded(batch: int = 2) -> RouterRecord:
    """Steps 0 and 2 recorded (step 1 not: MoA off there); map value 0.1 * (layer + 1) + 0.01 * image."""
    record = RouterRecord(PATHS)
    record.begin_run(SIGMAS)
    for step in (0, 2):
        for layer in range(len(PATHS)):
            rows = [torch.full((4, 4), 0.1 * (layer + 1) + 0.01 * image) for image in range(batch)]
            record.add(step, layer, torch.stack(rows))
    return record


@pytest.mark.parametrize(
    ("size", "longest", "fitted"),
    [((64, 64), 64, (64, 64)), ((32, 48), 64, (32, 48)), ((128, 192), 64, (43, 64)), ((96, 40), 48, (48, 20))],
)
def test_fit_shrinks_the_longest_side_keeping_the_aspect_and_never_enlarges(size, longest, fitted):
    assert fit(size, longest) == fitted


def test_pack_puts_tile_k_at_row_k_over_columns_and_pads_with_zeros():
    tiles = torch.arange(1, 6, dtype=torch.float32)[:, None, None].expand(5, 2, 3)  # 5 tiles of 2 x 3
    atlas = pack(tiles, columns=2)
    assert atlas.shape == (3 * 2, 2 * 3)
    for k in range(5):
        row, column = divmod(k, 2)
        assert torch.equal(atlas[row * 2 : row * 2 + 2, column * 3 : column * 3 + 3], tiles[k])
    assert torch.equal(atlas[4:, 3:], torch.zeros(2, 3))


def test_pack_keeps_trailing_channels():
    tiles = torch.rand(3, 2, 2, 3)
    atlas = pack(tiles, columns=3)
    assert atlas.shape == (2, 6, 3)
    assert torch.equal(atlas[:, 2:4], tiles[1])


def test_atlas_columns_make_a_near_square_that_holds_every_tile():
    for count in (1, 2, 4, 5, 25, 26, 1000):
        columns = atlas_columns(count)
        rows = -(-count // columns)
        assert columns * rows >= count and abs(columns - rows) <= 1
    assert atlas_columns(0) == 1


def test_to_bytes_rounds_and_clamps_to_0_255():
    values = torch.tensor([-0.5, 0.0, 0.5, 1 / 255 * 0.49, 1 / 255 * 0.51, 1.0, 2.0])
    assert to_bytes(values).tolist() == [0, 0, 128, 0, 1, 255, 255]
    assert to_bytes(values).dtype == torch.uint8


def test_group_step_maps_average_the_groups_layers_per_step_and_image():
    maps = group_step_maps(recorded(), (2, 2), batch=2)
    assert set(maps) == {"all", "cross-attention", "self-attention", "down", "up"}  # no middle layer recorded
    assert maps["all"].shape == (2, 3, 2, 2)
    half = lambda v: torch.tensor(v).half().float()  # noqa: E731  (maps are kept in half precision)
    for image in range(2):
        layer = [half(0.1 * (i + 1) + 0.01 * image) for i in range(3)]
        expected = {
            "all": sum(layer) / 3,
            "cross-attention": (layer[1] + layer[2]) / 2,
            "self-attention": layer[0],
            "down": (layer[0] + layer[1]) / 2,
            "up": layer[2],
        }
        for group, value in expected.items():
            for step in (0, 2):
                torch.testing.assert_close(maps[group][image, step], value.expand(2, 2), rtol=0, atol=1e-6)


def test_a_step_where_moa_did_not_act_is_all_prior_in_every_group():
    maps = group_step_maps(recorded(), (2, 2), batch=2)
    for group in maps.values():
        assert torch.equal(group[:, 1], torch.zeros(2, 2, 2))
    assert acted_steps(recorded()) == [True, False, True]


def test_map_atlases_hold_image_major_step_minor_tiles_as_bytes():
    maps = group_step_maps(recorded(), (2, 2), batch=2)
    atlases = map_atlases(maps, columns=atlas_columns(2 * 3))  # 6 tiles: 3 columns, 2 rows
    atlas = atlases["self-attention"]
    assert atlas.dtype == torch.uint8 and atlas.shape == (2 * 2, 3 * 2)
    for image in range(2):
        for step in range(3):
            row, column = divmod(image * 3 + step, 3)
            tile = atlas[row * 2 : row * 2 + 2, column * 2 : column * 2 + 2]
            assert torch.equal(tile, to_bytes(maps["self-attention"][image, step]))
    assert atlas[0, 0] == round(torch.tensor(0.1).half().item() * 255)


def test_picture_atlas_keeps_pictures_of_the_right_size_as_they_are():
    images = torch.rand(2, 6, 4, 3)
    atlas = picture_atlas(images, (6, 4), columns=2)
    assert atlas.shape == (6, 8, 3) and atlas.dtype == torch.uint8
    assert torch.equal(atlas[:, 4:], to_bytes(images[1]))


def test_picture_atlas_resizes_to_the_viewer_size():
    images = torch.zeros(1, 40, 20, 3)
    images[:, 20:] = 1.0  # dark top half, white bottom half
    atlas = picture_atlas(images, (8, 4), columns=1)
    assert atlas.shape == (8, 4, 3)
    assert atlas[:3].max() == 0 and atlas[5:].min() == 255
