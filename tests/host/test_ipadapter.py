"""Tier 2: IP-Adapter experts in the MoA patch on tiny ComfyUI models, SD1.5 and SDXL.

The expert with the router sending every pixel to it equals IP-Adapter's published layer, restated
in plain torch as an attn2 replace (what IP-Adapter's own processor computes); weight 0, the prior
router and a window that excludes every step give the base model bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from comfyui_moa.moa_core.attention_router import AttentionRouterConfig
from comfyui_moa.nodes.host.ipadapter import cross_attention_paths
from comfyui_moa.nodes.host.ipadapter_patch import ATTENTION
from comfyui_moa.nodes.host.unet_layers import attention_modules
from moa_testing.ipadapter import adapter_for, negative_of, outputs_of, subjects, with_adapter
from moa_testing.tiny import FAMILIES, sample

STEPS = 3
pytestmark = pytest.mark.parametrize("family", FAMILIES)


class ReferenceIPAdapter:
    """IP-Adapter's layer in plain torch, as an attn2 replace: Attn(q, k, v) + w * Attn(q, K_ip, V_ip),
    which the host then passes through to_out. Cond rows see the subject's tokens, uncond rows the
    negative image's (IP-Adapter's CFG)."""

    def __init__(self, adapter, ip_layer, tokens, negative_tokens, weight):
        self.k = [F.linear(t, ip_layer.to_k_ip.weight) for t in (tokens, negative_tokens)]
        self.v = [F.linear(t, ip_layer.to_v_ip.weight) for t in (tokens, negative_tokens)]
        self.weight = weight

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        chunks = extra_options["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        kind = torch.tensor([c for c in chunks for _ in range(per)])
        k_ip = torch.stack([self.k[int(c)] for c in kind])
        v_ip = torch.stack([self.v[int(c)] for c in kind])

        def attn(q, k, v):
            split = [rearrange(a, "b t (h d) -> b h t d", h=heads) for a in (q, k, v)]
            return rearrange(F.scaled_dot_product_attention(*split), "b h n d -> b n (h d)")

        return attn(q, k, v) + self.weight * attn(q, k_ip, v_ip)


def file_order(model) -> list[str]:
    """The cross-attention paths in diffusers' processor order, which IP-Adapter files follow: every
    transformer layer of the down blocks, then the up blocks, then the middle block, in module order."""
    unet = model.model.diffusion_model
    return [
        f"{part}.{name}"
        for part in ("input_blocks", "output_blocks", "middle_block")
        for name, _ in getattr(unet, part).named_modules()
        if name.endswith("attn2")
    ]


def reference_model(model, adapter, person, weight=1.0):
    from comfyui_moa.moa_core import block_key

    tokens = adapter.image_tokens(outputs_of(adapter, [person]))[0].float()
    negative = adapter.image_tokens(negative_of(adapter))[0].float()
    patched = model.clone()
    for i, path in enumerate(file_order(model)):
        name, block_id, index = block_key(path.rsplit(".", 1)[0])
        replace = ReferenceIPAdapter(adapter, adapter.layers[i], tokens, negative, weight)
        patched.set_model_attn2_replace(replace, name, block_id, index)
    return patched


@pytest.mark.parametrize("kind", ["sd15", "plus", "full-face"])
def test_expert_with_the_router_sending_every_pixel_to_it_is_ip_adapters_published_layer(
    base_model, conds, family, kind
):
    adapter = adapter_for(base_model, kind)
    (person,) = subjects(1)
    ours = sample(with_adapter(base_model, adapter, [person], weight=0.8), *conds, steps=STEPS)
    reference = sample(reference_model(base_model, adapter, person, weight=0.8), *conds, steps=STEPS)
    base = sample(base_model, *conds, steps=STEPS)
    difference, effect = (ours - reference).abs().max(), (reference - base).abs().max()
    print(f"{family} {kind}: max |ours - reference| = {difference:.3g}, |reference - base| = {effect:.3g}")
    assert (reference - base).abs().max() > 1e-2, "the test adapter does nothing"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)  # float rounding: to_out applied apart


@pytest.mark.parametrize(
    "options",
    [
        {"weight": 0.0},
        {"router_mode": "prior everywhere"},
        {"start_percent": 0.0, "end_percent": 0.0},
        {"router_mode": ATTENTION, "router": AttentionRouterConfig(warmup=0.99)},
    ],
    ids=["weight 0", "prior router", "window excludes every step", "router still warming up"],
)
def test_where_the_experts_get_no_weight_the_output_is_the_base_models_bit_for_bit(base_model, conds, options):
    adapter = adapter_for(base_model, "plus")
    patched = with_adapter(base_model, adapter, subjects(2), positions=((3,), (6,)), **options)
    # warming up: one step, at sigma 14.6 (a 3-step schedule's last sigma, 0.03, is already past 99 %)
    steps = 1 if "router" in options else STEPS
    assert torch.equal(sample(patched, *conds, steps=steps), sample(base_model, *conds, steps=steps))


def test_self_attention_stays_the_prior_and_only_cross_attention_is_patched(base_model, family):
    adapter = adapter_for(base_model, "sd15")
    patched = with_adapter(base_model, adapter, subjects(1))
    patches = patched.model_options["transformer_options"]["patches"]
    assert "attn1_patch" not in patches and "attn1_output_patch" not in patches
    assert len(patches["attn2_patch"]) == 1 and len(patches["attn2_output_patch"]) == 1
    assert len(cross_attention_paths(base_model)) == len(adapter.layers) == {"sd15": 4, "sdxl": 11}[family]
    assert {p for p in attention_modules(base_model.model.diffusion_model) if p.endswith("attn1")}
