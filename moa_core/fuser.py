"""The fuser: a subject's word token and its image embedding -> the token the personal branch sees."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import like


@dataclass(frozen=True)
class FuserConfig:
    text_dim: int = 768  # width of the text encoder's output tokens
    image_dim: int = 768  # width of the image embedding (CLIP ViT-L/14 projected)
    hidden_dim: int = 768
    timestep_conditioning: bool = True  # fused token depends on the diffusion timestep
    layer_conditioning: bool = True  # ... and on which cross-attention layer reads it
    num_layers: int = 0  # cross-attention layers the layer embedding indexes
    cond_dim: int = 128  # width of the timestep and layer embeddings


def timestep_features(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [b, dim] of diffusion timesteps [b] (0..999)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs
    features = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return features if dim == 2 * half else F.pad(features, (0, dim - 2 * half))


class Fuser(nn.Module):
    """FastComposer-style MLP on [word token; image embedding] (+ timestep and layer embeddings).

    The output is the word token plus the MLP's correction. The last layer starts at zero, so an
    untrained fuser returns the word token exactly and the personal branch reads the plain prompt.
    """

    def __init__(self, config: FuserConfig) -> None:
        super().__init__()
        self.config = config
        in_dim = config.text_dim + config.image_dim
        if config.timestep_conditioning:
            self.time_proj = nn.Linear(config.cond_dim, config.cond_dim)
            in_dim += config.cond_dim
        if config.layer_conditioning:
            if config.num_layers < 1:
                raise ValueError("FuserConfig.num_layers must be at least 1 with layer_conditioning")
            self.layer_embedding = nn.Embedding(config.num_layers, config.cond_dim)
            in_dim += config.cond_dim
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, config.hidden_dim)
        self.fc2 = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.fc3 = nn.Linear(config.hidden_dim, config.text_dim)
        with torch.no_grad():
            self.fc3.weight.zero_()
            self.fc3.bias.zero_()

    def time_embedding(self, timestep: torch.Tensor, like_tensor: torch.Tensor) -> torch.Tensor:
        """The timestep embedding [b, cond_dim] of timesteps [b] (0..999), in like_tensor's dtype and device."""
        features = timestep_features(timestep, self.config.cond_dim).to(like_tensor)
        return F.linear(features, like(self.time_proj.weight, like_tensor), like(self.time_proj.bias, like_tensor))

    def forward(
        self,
        word: torch.Tensor,
        image: torch.Tensor,
        timestep: torch.Tensor | None = None,
        layer: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """word tokens [..., d] + their subjects' image embeddings [..., e] -> fused tokens [..., d].

        `timestep` [...] (one per token) is needed with timestep conditioning, `layer` (index among
        the cross-attention layers, or a long tensor of them broadcasting over the tokens' leading
        dims) with layer conditioning.
        """
        lead, width = word.shape[:-1], word.shape[-1]
        parts = [word, like(image, word).expand(*lead, -1)]
        if self.config.timestep_conditioning:
            if timestep is None:
                raise ValueError("this fuser is timestep-conditioned: pass the timestep")
            # once per timestep entry, then broadcast: the tokens' layers share their timesteps
            t = self.time_embedding(timestep if timestep.dim() == 1 else timestep.reshape(-1), word)
            parts.append((t if timestep.dim() == 1 else t.view(*timestep.shape, -1)).expand(*lead, -1))
        if self.config.layer_conditioning:
            if layer is None:
                raise ValueError("this fuser is layer-conditioned: pass the layer index")
            parts.append(like(self.layer_embedding.weight[layer], word).expand(*lead, -1))
        h = torch.cat(parts, dim=-1).view(-1, self.norm.normalized_shape[0])  # the MLP on 2-D rows
        h = F.layer_norm(h, h.shape[-1:], like(self.norm.weight, word), like(self.norm.bias, word))
        h = F.gelu(F.linear(h, like(self.fc1.weight, word), like(self.fc1.bias, word)))
        h = F.gelu(F.linear(h, like(self.fc2.weight, word), like(self.fc2.bias, word)))
        return word + F.linear(h, like(self.fc3.weight, word), like(self.fc3.bias, word)).view(*lead, width)
