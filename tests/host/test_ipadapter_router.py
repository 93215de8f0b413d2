"""Tier 2: the attention router on a tiny model whose subject words are made to attend to known regions.

A test attn2 patch, registered before MoA's, adds to the cross-attention input at region r the
vector u_r whose query is a large multiple of subject r's word key: the model then looks at that
word there, as a trained model looks at "man" where it draws the man. The router must find the
regions (IoU reported) and give each pixel to one subject at most."""

import pytest
import torch

from comfyui_moa.moa_core import RouterRecord
from comfyui_moa.moa_core.attention_router import AttentionRouterConfig
from comfyui_moa.moa_core.helpers import seq_to_hw
from comfyui_moa.nodes.host.ipadapter import cross_attention_paths
from comfyui_moa.nodes.host.ipadapter_patch import ATTENTION
from comfyui_moa.nodes.host.unet_layers import attention_modules
from moa_testing.ipadapter import adapter_for, subjects, with_adapter
from moa_testing.tiny import FAMILIES, sample

STEPS = 6
WORDS = (3, 9)  # token positions of the two subject words
REGIONS = ((slice(2, 14), slice(1, 7)), (slice(4, 12), slice(9, 15)))  # (rows, cols) on a 16x16 grid


def region_mask(which: int, hw: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(16, 16)
    mask[REGIONS[which]] = 1.0
    return torch.nn.functional.interpolate(mask[None, None], size=hw, mode="nearest")[0, 0]


class LookAt:
    """attn2_patch: at region r, add the input that makes the query point at subject r's word key."""

    @torch.no_grad()
    def __init__(self, model, context, score: float = 8.0):
        self.pushes = {}
        for path, attn in attention_modules(model.model.diffusion_model).items():
            if path.endswith("attn2"):
                keys = attn.to_k(context[0, list(WORDS)])  # [2, inner]
                # to_q(u) = c * key, c such that every head's score q.k / sqrt(d) is about `score`
                heads, inner = attn.heads, keys.shape[-1]
                scale = score * (inner / heads) ** 0.5 * heads / (keys * keys).sum(dim=-1, keepdim=True)
                direction = torch.linalg.lstsq(attn.to_q.weight, (scale * keys).T).solution.T
                self.pushes[attn.to_q.in_features] = direction

    def __call__(self, n, context, value, extra_options):
        hw = seq_to_hw(n.shape[1], tuple(extra_options["original_shape"][-2:]))
        push = self.pushes[n.shape[-1]].to(n)
        regions = torch.stack([region_mask(r, hw).reshape(-1) for r in range(2)]).to(n)  # [2, n]
        return n + (regions.T @ push)[None], context, value

    def to(self, *args, **kwargs):
        return self

    def __deepcopy__(self, memo):
        return self


@pytest.fixture
def looking(base_model, conds):
    model = base_model.clone()
    model.set_model_attn2_patch(LookAt(base_model, conds[0][0][0]))
    return model


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def middle_layer(paths: list[str]) -> int:
    return next(i for i, path in enumerate(paths) if path.startswith("middle_block."))


@pytest.mark.parametrize("family", FAMILIES)
def test_router_maps_cover_the_regions_the_words_are_looked_at_and_subjects_never_share_a_pixel(looking, conds):
    adapter = adapter_for(looking, "plus")
    paths = cross_attention_paths(looking)
    record, per_subject = RouterRecord(paths), RouterRecord(paths)
    router = AttentionRouterConfig(downscale=2, warmup=0.0)
    patched = with_adapter(
        looking, adapter, subjects(2), positions=((WORDS[0],), (WORDS[1],)), record=record,
        subject_record=per_subject, router_mode=ATTENTION, router=router,
    )  # fmt: skip
    out = sample(patched, *conds, steps=STEPS)
    assert torch.isfinite(out).all()
    assert per_subject.steps() == list(range(STEPS)) and len(per_subject.layers()) == len(paths)
    first_layer = 0  # execution order
    assert per_subject.get(0, first_layer) is None, "at the first layer of the first call nothing is read yet"
    for step in per_subject.steps():
        for layer in per_subject.layers():
            if (step, layer) == (0, first_layer):
                continue
            maps = per_subject.get(step, layer).float()  # [b * s, h, w]
            assert int(((maps > 0).sum(dim=0) > 1).sum()) == 0, "two subjects share a pixel"
    last = per_subject.get(STEPS - 1, middle_layer(paths)).float()
    scores = []
    for r in range(2):
        scores.append(iou(last[r] > 0.5, region_mask(r, tuple(last.shape[-2:])) > 0.5))
    print(f"attention router IoU with the looked-at regions (16x16, step {STEPS}): {scores}")
    assert min(scores) > 0.6, scores
    union = record.get(STEPS - 1, middle_layer(paths)).float()
    torch.testing.assert_close(union, last.sum(dim=0, keepdim=True).clamp(max=1), rtol=0, atol=1e-3)  # fp16 record


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_run_starts_from_nothing_the_first_left(looking, conds):
    """Patch objects are shared by clones and runs: the accumulated maps live in the run."""
    adapter = adapter_for(looking, "sd15")
    router = AttentionRouterConfig(downscale=2, warmup=0.0)
    patched = with_adapter(
        looking, adapter, subjects(2), positions=((WORDS[0],), (WORDS[1],)), router_mode=ATTENTION, router=router
    )
    first = sample(patched, *conds, steps=STEPS)
    second = sample(patched, *conds, steps=STEPS)
    assert torch.equal(first, second)
    third = sample(patched.clone(), *conds, steps=STEPS)
    assert torch.equal(first, third)


def test_the_attention_router_drives_trained_moa_weights_too(looking, conds, trained):
    """RouterMode.ATTENTION with MoA weights: r1 is the union of the subjects' masks, recorded like
    a learned router's; before the warm-up every layer is the prior, and runs do not leak."""
    from comfyui_moa.moa_core import PersonalPrompt, RouterMode
    from comfyui_moa.nodes.host.patch import MoAOptions, apply_moa
    from moa_testing.tiny import model_patcher

    embeds = torch.randn(2, 768, generator=torch.Generator().manual_seed(3))
    prompt = PersonalPrompt.single(77, list(WORDS), [0, 1], embeds)
    router = AttentionRouterConfig(downscale=2, warmup=0.0)
    record = RouterRecord(trained.paths)
    options = MoAOptions(router_mode=RouterMode.ATTENTION, attention_router=router, sparse_threshold=0.0)
    patched = apply_moa(looking, model_patcher(trained), prompt, options, record)
    out = sample(patched, *conds, steps=STEPS)
    base = sample(looking, *conds, steps=STEPS)
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(sample(patched, *conds, steps=STEPS), out)
    middle = trained.paths.index("middle_block.1.transformer_blocks.0.attn2")
    r1 = record.get(STEPS - 1, middle).float()[0]
    both = (region_mask(0, (16, 16)) + region_mask(1, (16, 16))) > 0.5
    print(f"attention router with MoA weights: IoU of r1 > 0.5 with both regions {iou(r1 > 0.5, both):.2f}")
    assert iou(r1 > 0.5, both) > 0.6
    self_attention = trained.paths.index("middle_block.1.transformer_blocks.0.attn1")
    # self-attention layers follow the same maps (read up to the layer before: attn1 runs before attn2)
    assert iou(record.get(STEPS - 1, self_attention).float()[0] > 0.5, both) > 0.6
    # one step, at sigma 14.6: before the warm-up (90 % of the schedule)
    warming = MoAOptions(router_mode=RouterMode.ATTENTION, attention_router=AttentionRouterConfig(warmup=0.9))
    warm_patched = apply_moa(looking, model_patcher(trained), prompt, warming)
    assert torch.equal(sample(warm_patched, *conds, steps=1), sample(looking, *conds, steps=1))
