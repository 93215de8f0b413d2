"""The training losses: masked diffusion, router (background -> prior) and object localisation.

Pure functions of tensors. Every loss is a mean over the batch of per-sample values, each sample
weighing the same whatever the size of its subjects: a batch split across processes (each averaging
its own equal share, then DistributedDataParallel averaging the gradients) gives the gradient of
the whole batch's loss.

Masks arrive at image resolution and are brought to each grid by area averaging, so a grid cell
holds the fraction of it that the subject covers: a soft mask that keeps thin or small subjects.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

EPS = 1e-6


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """mask [b, H, W] in [0, 1] -> [b, h, w]: the covered fraction of each cell (area average)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask.float()[:, None], size=size, mode="area")[:, 0]


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean of values [b, ...] with weights [b, ...] -> [b]; 0 where a sample's
    weights are all zero (a sample with nothing to supervise adds nothing)."""
    values, weights = values.flatten(1), weights.flatten(1)
    return (values * weights).sum(1) / weights.sum(1).clamp_min(EPS)


def masked_diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, sample_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared error of the noise prediction on subject pixels only.

    prediction, target [b, d, h, w] (latent); mask [b, H, W] in [0, 1] (the union of the subjects);
    `sample_weights` [b] scale each sample's loss (the timestep weighting, `v_weights`).
    Each sample's loss is the mean over its masked latent elements (channels included), then the
    batch is averaged. Normalising by the mask's area, unlike FastComposer's plain mean over all
    elements, keeps the loss on the scale of an ordinary diffusion loss and gives a small face the
    same weight as a large one; a sample whose mask is empty contributes 0.
    """
    weights = resize_mask(mask, tuple(prediction.shape[-2:]))[:, None].expand_as(prediction)
    per_sample = masked_mean((prediction.float() - target.float()) ** 2, weights)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    return per_sample.mean()


def v_weights(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weights [b] that turn the squared noise error into the squared v error
    (sigma^2 + 1 on the variance-preserving schedule): the eps loss weighs an x0 error by
    1 / sigma^2, so it spends almost nothing on the high-noise steps where a subject's colours and
    layout are decided; the v loss weighs them sigma^2 + 1 times more."""
    return sigma.flatten().float() ** 2 + 1.0


def prior_map(
    r1: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], size: tuple[int, int] | None = None
) -> torch.Tensor:
    """R = mean over layers of the prior's weight r0 = 1 - r1, each map resized to one grid.

    r1: per layer [b, n, 1] with n = h * w of that layer's `grids` entry. `size` defaults to the
    largest grid. Returns R [b, size[0], size[1]].
    """
    if not r1:
        raise ValueError("prior_map needs the router weights of at least one layer")
    if size is None:
        size = max(grids, key=lambda hw: hw[0] * hw[1])
    maps = []
    for weights, (h, w) in zip(r1, grids, strict=True):
        r0 = 1.0 - rearrange(weights.float(), "b (h w) 1 -> b 1 h w", h=h, w=w)
        if (h, w) != tuple(size):
            r0 = F.interpolate(r0, size=size, mode="bilinear", align_corners=False)
        maps.append(r0[:, 0])
    return torch.stack(maps).mean(0)


def router_loss(
    r1: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    mask: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """MoA's router loss ||(1 - M) ⊙ (1 - R)||²: background pixels pushed to the prior.

    R is `prior_map(r1, grids, size)`; mask [b, H, W] is the subjects' union. Per sample, the mean
    of (1 - R)^2 over background pixels (weighted by 1 - M, the background fraction of each cell),
    then the batch mean. The subject pixels are left free: nothing asks them to go personal.
    """
    prior = prior_map(r1, grids, size)
    background = 1.0 - resize_mask(mask, tuple(prior.shape[-2:]))
    return masked_mean((1.0 - prior) ** 2, background).mean()


def router_subject_loss(
    r1: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    mask: torch.Tensor,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The router loss's other half, ||M ⊙ R||²: subject pixels pushed to the personal expert.

    Not in the paper, which leaves the subject free. The small world measured why it is needed:
    with the background term alone the routers learn a constant (the prior's weight near 1 on
    subject and background alike, docs/small-world.md), because the personal expert starts as
    a copy of the prior and so gives the diffusion loss no reason to route to it. Per sample,
    the mean of R^2 over subject pixels (weighted by M), then the batch mean (samples without a
    subject add 0)."""
    prior = prior_map(r1, grids, size)
    subject = resize_mask(mask, tuple(prior.shape[-2:]))
    return masked_mean(prior**2, subject).mean()


def object_loss(
    attention: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    token_masks: torch.Tensor,
    token_rows: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """FastComposer's balanced L1 localisation loss on the personal expert's cross-attention.

    attention: per layer [k, h, n], how much each of n = grid pixels attends to each of k subject
    tokens (h heads); token_masks [k, H, W]: the mask of each token's subject; token_rows [k]: the
    batch row of each token. A token's value is its mean attention outside its subject minus its
    mean attention inside, averaged over heads and layers; a sample's value is the mean over its
    tokens (0 without any), and the loss is the mean over the `batch` samples.
    """
    if token_rows.numel() == 0:
        return token_masks.new_zeros(())
    per_layer = []
    for probs, (h, w) in zip(attention, grids, strict=True):
        # every head shares the token's mask, so one mean over (heads, pixels) is the mean of the heads' means
        inside = rearrange(resize_mask(token_masks, (h, w)), "k h w -> k 1 (h w)").to(probs.device)
        probs = probs.float()
        outside_mean = masked_mean(probs, (1.0 - inside).expand_as(probs))
        per_layer.append(outside_mean - masked_mean(probs, inside.expand_as(probs)))
    per_token = torch.stack(per_layer).mean(0)
    rows = token_rows.to(per_token.device)
    totals = per_token.new_zeros(batch).index_add(0, rows, per_token)
    counts = per_token.new_zeros(batch).index_add(0, rows, torch.ones_like(per_token))
    return (totals / counts.clamp_min(1.0)).mean()
