"""Face alignment maths: a similarity transform from detected landmarks to a template, and the warp."""

import torch
import torch.nn.functional as F


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The rotation + uniform scale + translation that best maps points src [k, 2] onto dst [k, 2]
    (least squares, Umeyama 1991), as a [2, 3] matrix acting on (x, y, 1)."""
    src, dst = src.double(), dst.double()
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, s, vh = torch.linalg.svd(dst_c.T @ src_c / len(src))
    sign = torch.ones(2, dtype=torch.float64)
    if torch.det(u) * torch.det(vh) < 0:  # a reflection is no similarity: flip the weakest axis
        sign[-1] = -1.0
    rotation = u @ torch.diag(sign) @ vh
    scale = (s * sign).sum() / src_c.pow(2).sum(dim=1).mean()
    translation = dst_mean - scale * rotation @ src_mean
    return torch.cat([scale * rotation, translation[:, None]], dim=1).float()


def warp_affine(image: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """Resample image [H, W, c] so that output pixel (x, y) shows the input at matrix^-1 (x, y):
    -> [size, size, c]. Outside the image is black."""
    height, width = image.shape[:2]
    full = torch.cat([matrix.double(), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    inverse = torch.linalg.inv(full)[:2].float()
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    # pixel centres, as OpenCV's warpAffine samples them
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ inverse.T
    grid = torch.stack([(points[..., 0] + 0.5) / width * 2 - 1, (points[..., 1] + 0.5) / height * 2 - 1], dim=-1)
    out = F.grid_sample(
        image.permute(2, 0, 1)[None].float(), grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out[0].permute(1, 2, 0).to(image.dtype)


def template_in_canvas(template: torch.Tensor, template_size: float, size: int, margin: float) -> torch.Tensor:
    """Landmark template [k, 2] (in a `template_size` square) placed in a `size` canvas with
    `margin` (fraction of the face's side) of context on every side."""
    scale = size / (template_size * (1.0 + 2.0 * margin))
    return template * scale + margin * template_size * scale
