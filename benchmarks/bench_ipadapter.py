"""The IP-Adapter modes of bench_sampling.py: our expert with the attention router, and IP-Adapter's own cost.

An ip-adapter-plus layout for the benchmark's UNet (random weights, the published key names), two
subjects bound to two words. Modes (tokens of bench_sampling's --modes):
    ipadapter             MoA IP-Adapter Apply as the node runs it (router from attention), the
                          warm-up 0 so the router acts in the timed one-step calls
    ipadapter+everywhere  our expert with the router forced to personal everywhere (no router)
    ipadapter+weight=0    the attention router reading its maps, every expert at weight 0: the router's cost
    ipadapter+reference   IP-Adapter applied everywhere the way IP-Adapter computes it, in the host's
                          attention (an attn2 replace: Attn(q, k, v) + w * sum_i Attn(q, k_ip_i, v_ip_i)
                          before to_out, one adapter per subject as IPAdapter_plus chains them): what
                          the adapter alone costs
"""

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WORDS = (5, 8)  # token positions of the two subject words in the benchmark's prompt


class ReferenceReplace:
    """IP-Adapter's layer as its own processor computes it, in the attn2 replace slot, one adapter
    per subject as ComfyUI_IPAdapter_plus chains them: Attn(q, k, v) + sum_i w * Attn(q, k_ip_i, v_ip_i)."""

    def __init__(self, layer, cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor, weight: float) -> None:
        with torch.no_grad():
            self.k = [[F.linear(t, layer.to_k_ip.weight) for t in (c, uncond_tokens[0])] for c in cond_tokens]
            self.v = [[F.linear(t, layer.to_v_ip.weight) for t in (c, uncond_tokens[0])] for c in cond_tokens]
        self.weight = weight

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads, chunks = extra_options["n_heads"], extra_options["cond_or_uncond"]
        per = q.shape[0] // len(chunks)
        out = optimized_attention(q, k, v, heads)
        for keys, values in zip(self.k, self.v, strict=True):
            k_ip = torch.cat([keys[c].to(q).expand(per, -1, -1) for c in chunks])
            v_ip = torch.cat([values[c].to(q).expand(per, -1, -1) for c in chunks])
            out = out + self.weight * optimized_attention(q, k_ip, v_ip, heads)
        return out

    def __deepcopy__(self, memo):
        return self


def variant(base, flags: set[str], weight: float, seed: int = 6):
    """The patched model of one IP-Adapter mode."""
    import bench_setup

    from comfyui_moa.moa_core import RouterRecord, block_key
    from comfyui_moa.moa_core.attention_router import AttentionRouterConfig
    from comfyui_moa.moa_core.ipadapter import build_ipadapter
    from comfyui_moa.nodes.host.ipadapter import _FILE_ORDER, _order, build_runtime, cross_attention_paths
    from comfyui_moa.nodes.host.ipadapter_patch import ATTENTION, apply_ipadapter
    from moa_testing.ipadapter_files import state_dict_for

    adapter = build_ipadapter(state_dict_for(base, "plus", seed=seed, std=0.02), "bench")
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(WORDS), 257, 1280, generator=generator)
    negative = torch.randn(1, 257, 1280, generator=generator)
    paths = _order(cross_attention_paths(base), _FILE_ORDER)
    if "reference" in flags:
        with torch.no_grad():
            cond, uncond = adapter.image_tokens(hidden), adapter.image_tokens(negative)
        patched = base.clone()
        for layer, path in zip(adapter.layers, paths, strict=True):
            name, block_id, index = block_key(path.rsplit(".", 1)[0])
            patched.set_model_attn2_replace(ReferenceReplace(layer, cond, uncond, weight), name, block_id, index)
        return patched, None
    options = {
        "weight": weight, "weight_type": "linear", "start_percent": 0.0, "end_percent": 1.0,
        "router_mode": "personal everywhere" if "everywhere" in flags else ATTENTION,
        "router": AttentionRouterConfig(warmup=0.0), "sparse_threshold": 0.01, "input_name": "bench",
    }  # fmt: skip
    record = RouterRecord(cross_attention_paths(base))
    runtime = build_runtime(
        base, bench_setup.weights_patcher(adapter), hidden, negative, [(w,) for w in WORDS], 77, options, paths,
        record,
    )  # fmt: skip
    return apply_ipadapter(base, runtime, "bench"), record


def ratios(size: int, names: list[str], results: dict) -> list[str]:
    """The IP-Adapter modes against the reference (medians and the fastest calls)."""
    reference = next((n for n in names if "reference" in n), None)
    if reference is None or not results[reference].times:
        return []
    ref = results[reference]
    lines = []
    for name in names:
        if name.startswith("ipadapter") and name != reference and results[name].times:
            res = results[name]
            median = statistics.median(res.times) / statistics.median(ref.times)
            fastest = min(res.times) / min(ref.times)
            paired = statistics.median(res.paired) / statistics.median(ref.paired) if res.paired else float("nan")
            lines.append(
                f"- {size} px: {name} / {reference}: {median:.3f} (medians), {paired:.3f} (paired, each over the "
                f"base call beside it), {fastest:.3f} (fastest)"
            )
    return lines
