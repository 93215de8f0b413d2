import pytest
import torch

from comfyui_moa.moa_core.errors import OptionsError
from comfyui_moa.moa_core.helpers import seq_to_hw
from comfyui_moa.moa_core.region import check_region, region_at, region_levels


def centred_square(size: int, side: int) -> torch.Tensor:
    region = torch.zeros(size, size)
    start = (size - side) // 2
    region[start : start + side, start : start + side] = 1.0
    return region


def test_a_square_over_a_quarter_of_the_image_is_a_quarter_of_every_sd15_level():
    levels = region_levels(centred_square(512, 256), (64, 64), torch.device("cpu"), torch.float32)
    for hw in [(64, 64), (32, 32), (16, 16), (8, 8)]:
        region = levels[hw[0] * hw[1]]
        assert region.shape == (hw[0] * hw[1], 1)
        assert region.mean() == 0.25  # the square's edges fall on grid lines: values are 0 or 1
        grid = region.reshape(hw)
        assert grid[hw[0] // 2, hw[1] // 2] == 1.0 and grid[0, 0] == 0.0


@pytest.mark.parametrize("latent", [(64, 64), (9, 13), (128, 72)])
def test_levels_cover_every_grid_the_unet_makes_of_the_latent(latent):
    levels = region_levels(torch.rand(40, 30), latent, torch.device("cpu"), torch.float16)
    for n, region in levels.items():
        seq_to_hw(n, latent)  # each pixel count is a level of this latent
        assert region.dtype == torch.float16 and region.shape == (n, 1)
    assert 1 in levels and latent[0] * latent[1] in levels


def test_a_region_at_the_grid_size_is_used_as_it_is_and_resizing_is_bilinear():
    region = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(region_at(region, (8, 8)), region.reshape(-1, 1))
    up = region_at(torch.tensor([[0.0, 1.0]]), (1, 4)).flatten()
    torch.testing.assert_close(up, torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_a_comfyui_mask_of_one_image_is_accepted():
    assert check_region(torch.ones(1, 16, 24), "region").shape == (16, 24)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.ones(2, 8, 8), "one mask"),
        (torch.ones(8), "one mask"),
        (torch.full((8, 8), 1.5), r"in \[0, 1\]"),
        (torch.full((8, 8), float("nan")), r"in \[0, 1\]"),
    ],
)
def test_bad_regions_are_refused_naming_the_input(mask, message):
    with pytest.raises(OptionsError, match=f"region: .*{message}"):
        check_region(mask, "region")
