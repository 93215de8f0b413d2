"""Names of the UNet attention layers MoA patches, and the layer tables of SD1.5 and SDXL.

A layer is named by its stable UNet path (`input_blocks.1.1.transformer_blocks.0.attn2`), which is
what the weights file stores. ComfyUI's patches identify the same layer by the block key
`(block name, block id, index in the transformer)` plus the hook kind (attn1 or attn2).
"""

import re
from dataclasses import dataclass

BlockKey = tuple[str, int, int]

_BLOCK_PATH = re.compile(r"^(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.1\.transformer_blocks\.(\d+)$")
_PREFIX = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}
_NAME = {prefix: name for name, prefix in _PREFIX.items()}


def block_path(key: BlockKey) -> str:
    """UNet path of a transformer block: ("input", 1, 0) -> "input_blocks.1.1.transformer_blocks.0"."""
    name, block_id, index = key
    if name == "middle":
        return f"middle_block.1.transformer_blocks.{index}"
    return f"{_PREFIX[name]}.{block_id}.1.transformer_blocks.{index}"


def block_key(path: str) -> BlockKey:
    """Inverse of `block_path`."""
    match = _BLOCK_PATH.match(path)
    if match is None:
        raise ValueError(f"{path!r} is not a UNet transformer block path")
    prefix, block_id, middle, index = match.groups()
    return (_NAME[prefix or middle], int(block_id or 0), int(index))


@dataclass(frozen=True)
class LayerSpec:
    """One attention layer: its UNet path and the shapes of its projections."""

    path: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    query_dim: int  # channels of the hidden state (c)
    context_dim: int  # channels of the keys' source: c for attn1, the text width for attn2
    inner_dim: int  # heads * dim_head

    @property
    def is_cross(self) -> bool:
        return self.path.endswith(".attn2")

    @property
    def block(self) -> BlockKey:
        return block_key(self.path.rsplit(".", 1)[0])


def _sd15_blocks() -> tuple[BlockKey, ...]:
    inputs = [("input", i, 0) for i in (1, 2, 4, 5, 7, 8)]
    outputs = [("output", i, 0) for i in range(3, 12)]
    return (*inputs, ("middle", 0, 0), *outputs)


def _sdxl_blocks() -> tuple[BlockKey, ...]:
    inputs = [("input", i, j) for i, depth in ((4, 2), (5, 2), (7, 10), (8, 10)) for j in range(depth)]
    middle = [("middle", 0, j) for j in range(10)]
    outputs = [
        ("output", i, j) for i, depth in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for j in range(depth)
    ]
    return (*inputs, *middle, *outputs)


FAMILY_BLOCKS: dict[str, tuple[BlockKey, ...]] = {"sd15": _sd15_blocks(), "sdxl": _sdxl_blocks()}
"""Transformer blocks of each supported family in UNet order; every block has attn1 and attn2."""


def family_layer_paths(family: str) -> list[str]:
    """The attention layer paths (attn1 and attn2 of every block) of a full model of `family`."""
    return [f"{block_path(key)}.{attn}" for key in FAMILY_BLOCKS[family] for attn in ("attn1", "attn2")]


LAYER_GROUPS = ("all", "cross-attention", "self-attention", "down", "middle", "up")
_GROUP_TEST = {
    "all": lambda path: True,
    "cross-attention": lambda path: path.endswith(".attn2"),
    "self-attention": lambda path: path.endswith(".attn1"),
    "down": lambda path: path.startswith("input_blocks."),
    "middle": lambda path: path.startswith("middle_block."),
    "up": lambda path: path.startswith("output_blocks."),
}


def layers_in_group(paths: list[str] | tuple[str, ...], group: str) -> list[int]:
    """Indices of the layer paths that belong to `group` (one of LAYER_GROUPS)."""
    return [i for i, path in enumerate(paths) if _GROUP_TEST[group](path)]


GRID_LAYERS = 32
"""The layer-step grid of the router masks gives each layer a row up to this many (SD1.5 has 32); more
(SDXL: 140) are averaged per UNet block and attention kind, a row per block's self- or cross-attention."""


def grid_rows(paths: list[str] | tuple[str, ...], layers: list[int], most: int = GRID_LAYERS) -> list[list[int]]:
    """The rows of the layer-step grid for `layers` (indices into `paths`), in their order: one layer a
    row when there are at most `most`, else the layers of one block (every transformer of
    `input_blocks.7`, say) and one kind (attn1, attn2) together."""
    if len(layers) <= most:
        return [[i] for i in layers]
    rows: dict[tuple[str, str], list[int]] = {}
    for i in layers:
        block, _, kind = paths[i].rpartition(".")
        rows.setdefault((block.split(".transformer_blocks.")[0], kind), []).append(i)
    return list(rows.values())
