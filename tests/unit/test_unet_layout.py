from collections import Counter

import pytest

from comfyui_moa.moa_core.unet_layout import (
    FAMILY_BLOCKS,
    LayerSpec,
    block_key,
    block_path,
    family_layer_paths,
    grid_rows,
    layers_in_group,
)


@pytest.mark.parametrize(
    ("key", "path"),
    [
        (("input", 1, 0), "input_blocks.1.1.transformer_blocks.0"),
        (("input", 8, 9), "input_blocks.8.1.transformer_blocks.9"),
        (("middle", 0, 0), "middle_block.1.transformer_blocks.0"),
        (("middle", 0, 7), "middle_block.1.transformer_blocks.7"),
        (("output", 11, 0), "output_blocks.11.1.transformer_blocks.0"),
        (("output", 2, 4), "output_blocks.2.1.transformer_blocks.4"),
    ],
)
def test_block_path_and_block_key_round_trip(key, path):
    assert block_path(key) == path
    assert block_key(path) == key


@pytest.mark.parametrize(
    "path",
    [
        "input_blocks.1.1.transformer_blocks.0.attn2",  # a layer, not a block
        "input_blocks.1.0.transformer_blocks.0",  # index 0 of a UNet block is its ResBlock
        "diffusion_model.input_blocks.1.1.transformer_blocks.0",
        "output_blocks.x.1.transformer_blocks.0",
        "decoder_blocks.1.1.transformer_blocks.0",
        "middle_block.1.transformer_blocks",
        "",
    ],
)
def test_block_key_rejects_non_unet_paths(path):
    with pytest.raises(ValueError, match="is not a UNet transformer block path"):
        block_key(path)


@pytest.mark.parametrize(
    "path",
    [
        "input_blocks.1.transformer_blocks.0",  # input blocks always have an id
        "output_blocks.1.transformer_blocks.0",
        "middle_block.3.1.transformer_blocks.0",  # the middle block has none
    ],
)
def test_block_key_rejects_paths_that_block_path_never_produces(path):
    with pytest.raises(ValueError, match="is not a UNet transformer block path"):
        block_key(path)


def test_sd15_table_has_the_16_attention_blocks_of_sd15():
    # SD1.5: attention at input blocks 1,2,4,5,7,8, the middle block and output blocks 3..11, depth 1.
    expected = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
    expected += [("output", i, 0) for i in range(3, 12)]
    assert list(FAMILY_BLOCKS["sd15"]) == expected
    assert len(family_layer_paths("sd15")) == 32


def test_sdxl_table_has_the_70_attention_blocks_of_sdxl():
    depths = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10}
    depths |= {("output", i): 10 for i in (0, 1, 2)} | {("output", i): 2 for i in (3, 4, 5)}
    blocks = FAMILY_BLOCKS["sdxl"]
    assert len(blocks) == 70 == sum(depths.values())
    assert Counter((name, block_id) for name, block_id, _ in blocks) == depths
    for name, block_id, index in blocks:
        assert 0 <= index < depths[(name, block_id)]
    assert len(family_layer_paths("sdxl")) == 140


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_family_tables_are_in_unet_order_without_duplicates(family):
    blocks = FAMILY_BLOCKS[family]
    order = {"input": 0, "middle": 1, "output": 2}
    assert list(blocks) == sorted(blocks, key=lambda key: (order[key[0]], key[1], key[2]))
    paths = family_layer_paths(family)
    assert len(set(blocks)) == len(blocks)
    assert len(set(paths)) == len(paths) == 2 * len(blocks)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_family_layer_paths_are_attn1_then_attn2_of_each_block(family):
    paths = family_layer_paths(family)
    for i, key in enumerate(FAMILY_BLOCKS[family]):
        assert paths[2 * i] == block_path(key) + ".attn1"
        assert paths[2 * i + 1] == block_path(key) + ".attn2"
        assert LayerSpec(paths[2 * i], 320, 320, 320).block == key


def test_layer_spec_is_cross_only_for_attn2():
    self_attn = LayerSpec("output_blocks.5.1.transformer_blocks.1.attn1", 640, 640, 640)
    cross_attn = LayerSpec("output_blocks.5.1.transformer_blocks.1.attn2", 640, 2048, 640)
    assert not self_attn.is_cross
    assert cross_attn.is_cross
    assert self_attn.block == cross_attn.block == ("output", 5, 1)


def test_the_grid_has_a_row_per_layer_on_sd15_and_per_block_and_kind_on_sdxl():
    sd15 = family_layer_paths("sd15")
    assert grid_rows(sd15, list(range(32))) == [[i] for i in range(32)]
    sdxl = family_layer_paths("sdxl")
    cross = layers_in_group(sdxl, "cross-attention")
    rows = grid_rows(sdxl, cross)
    assert [len(row) for row in rows] == [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]  # input 4 5 7 8, middle, output 0-5
    assert sorted(i for row in rows for i in row) == cross
    for row in rows:
        blocks = {block_key(sdxl[i].rpartition(".")[0])[:2] for i in row}
        assert len(blocks) == 1 and all(sdxl[i].endswith(".attn2") for i in row)
    every = grid_rows(sdxl, list(range(len(sdxl))))
    assert len(every) == 22 and all(len({sdxl[i][-5:] for i in row}) == 1 for row in every)
