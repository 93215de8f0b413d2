"""IP-Adapter's image projections: CLIP-vision outputs -> image tokens in the text's width.

Written from the published architecture (Ye et al. 2023, "IP-Adapter", tencent-ailab/IP-Adapter):
parameter names follow the files users have, so their state dicts load as they are.

- `LinearProjection` (ip-adapter_sd15, light_v11): image_embeds [b, e] -> [b, 4, d]
  (`proj` Linear(e, 4d), `norm` LayerNorm(d)).
- `Resampler` (ip-adapter-plus, plus-face): penultimate hidden states [b, 257, e] -> [b, 16, d];
  16 learned latents read the image through 4 perceiver-attention layers with feed-forwards.
- `TokenMLP` (ip-adapter-full-face): penultimate hidden states [b, 257, e] -> [b, 257, d], each
  token through Linear, GELU, Linear, LayerNorm (`proj.0`, `proj.2`, `proj.3`).
"""

import torch
from einops import rearrange
from torch import nn


class LinearProjection(nn.Module):
    def __init__(self, embed_dim: int, token_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, token_dim * tokens)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [b, e] -> [b, tokens, d]"""
        return self.norm(rearrange(self.proj(image_embeds), "b (t d) -> b t d", t=self.tokens))


class TokenMLP(nn.Module):
    def __init__(self, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, token_dim), nn.LayerNorm(token_dim)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [b, t, e] -> [b, t, d]"""
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """The latents attend to the image tokens and to themselves (keys from both, queries from the latents)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, image: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """image [b, t, d], latents [b, l, d] -> [b, l, d]"""
        image, latents = self.norm1(image), self.norm2(latents)
        q = rearrange(self.to_q(latents), "b l (h d) -> b h l d", h=self.heads)
        k, v = self.to_kv(torch.cat([image, latents], dim=1)).chunk(2, dim=-1)
        k, v = (rearrange(a, "b t (h d) -> b h t d", h=self.heads) for a in (k, v))
        # the softmax in float32, as the reference computes it
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        out = scores.softmax(dim=-1).to(v.dtype) @ v
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class Resampler(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        token_dim: int,
        tokens: int = 16,
        depth: int = 4,
        heads: int = 12,
        head_dim: int = 64,
        width: int | None = None,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        width = width or token_dim  # the latents' width: the text width in the SD1.5 files
        self.latents = nn.Parameter(torch.zeros(1, tokens, width))
        self.proj_in = nn.Linear(embed_dim, width)
        self.proj_out = nn.Linear(width, token_dim)
        self.norm_out = nn.LayerNorm(token_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(width, heads, head_dim),
                    nn.Sequential(
                        nn.LayerNorm(width),
                        nn.Linear(width, width * ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(width * ff_mult, width, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [b, t, e] -> [b, tokens, d]"""
        latents = self.latents.expand(hidden_states.shape[0], -1, -1)
        image = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(image, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def linear_tokens(image_proj: dict[str, torch.Tensor]) -> int:
    """How many tokens a LinearProjection state dict makes (its `proj` is [tokens * d, e])."""
    return image_proj["proj.weight"].shape[0] // image_proj["norm.weight"].shape[0]


def resampler_shape(image_proj: dict[str, torch.Tensor]) -> dict[str, int]:
    """Resampler arguments read from its state dict (heads: 64-wide heads, as in every published file)."""
    tokens, width = image_proj["latents"].shape[1:]
    depth = 1 + max(int(key.split(".")[1]) for key in image_proj if key.startswith("layers."))
    inner = image_proj["layers.0.0.to_q.weight"].shape[0]
    return {
        "embed_dim": image_proj["proj_in.weight"].shape[1],
        "token_dim": image_proj["proj_out.weight"].shape[0],
        "tokens": tokens,
        "depth": depth,
        "heads": inner // 64,
        "head_dim": 64,
        "width": width,
        "ff_mult": image_proj["layers.0.1.1.weight"].shape[0] // width,
    }
