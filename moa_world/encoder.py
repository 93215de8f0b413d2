"""The world's subject encoder: the tiny comfy.clip_vision.ClipVisionModel (models.VISION_CONFIG),
trained to tell the generic creatures' attributes apart. It never sees a held-out identity.

Call `moa_pack.use_host(cpu=...)` before importing this module.

Why trained, not fixed random: MoA's fuser reads the projected image embedding (`image_embeds`,
64-d); a random ViT's embedding mixes colour and layout arbitrarily and the fuser would have to
untangle it from MoA's small training set. So the encoder learns, on subject crops of generic
creatures only (scenes.generic_scenes: HELD_OUT never drawn), to predict the word, body colour,
pattern and mark colour from `image_embeds` through linear heads (dropped afterwards). The held-
out identities are new combinations of attributes it has seen one by one, which is what makes an
embedding of an unseen identity meaningful, as CLIP's is for a face it never saw.

Crops are made as moa_train makes them (moa_train/images.py subject_crop + pad_square): the
subject's mask box, uniform noise outside the mask, padded square, then resized to 32 px.
`train_encoder(vision, seed, steps) -> facts` trains `vision` in place (fp32);
`encoder_report(vision, heads)` is the attribute accuracy on crops of fresh generic scenes.
"""

import numpy as np
import torch
import torch.nn.functional as F
from comfy.clip_vision import clip_preprocess
from comfy.ldm.modules.attention import optimized_attention_for_device
from torch import nn

from ..moa_core.subject import mask_box, pad_square
from . import scenes as S


def subject_crops(scenes: list[S.Scene], seed: int, size: int = 32) -> tuple[torch.Tensor, list[S.Identity]]:
    """Every subject of `scenes` as the trainer crops it: [c, size, size, 3] in [0, 1], and its identity."""
    generator = torch.Generator().manual_seed(seed)
    crops, identities = [], []
    for scene in scenes:
        r = S.render(scene)
        for creature, mask in zip(scene.creatures, r.subject_masks, strict=True):
            noise = torch.rand(r.image.shape, generator=generator)
            top, bottom, left, right = mask_box(mask)
            crop = torch.where(mask, r.image, noise)[:, top:bottom, left:right]
            square = pad_square(crop)[None]
            crops.append(F.interpolate(square, size=(size, size), mode="bilinear", antialias=True)[0])
            identities.append(creature.identity)
    return torch.stack(crops).movedim(1, -1).clamp(0, 1), identities


def labels(identities: list[S.Identity]) -> dict[str, torch.Tensor]:
    indices = torch.tensor([S.attribute_indices(i) for i in identities])
    return dict(zip(S.ATTRIBUTES, indices.unbind(1), strict=True))


def embed(vision, crops: torch.Tensor) -> torch.Tensor:
    """crops [c, H, W, 3] -> image_embeds [c, e], with gradients: encode_image's computation, as
    moa_train's encode_subjects runs it (ComfyUI's CLIPLayer adds in place, which autograd refuses)."""
    pixels = clip_preprocess(crops, size=vision.image_size, mean=vision.image_mean, std=vision.image_std, crop=True)
    model = vision.model.vision_model
    attention = optimized_attention_for_device(pixels.device, mask=False, small_input=True)
    x = model.pre_layrnorm(model.embeddings(pixels.float()))
    for layer in model.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return vision.model.visual_projection(model.post_layernorm(x[:, 0]))


def train_encoder(vision, seed: int = 0, steps: int = 1200, batch: int = 48, log=None) -> tuple[dict, nn.ModuleDict]:
    """Train `vision` on generic creatures' attributes; returns (facts, the attribute heads)."""
    torch.manual_seed(seed)
    dim = vision.model.visual_projection.out_features
    heads = nn.ModuleDict({name: nn.Linear(dim, len(values)) for name, values in S.ATTRIBUTES.items()})
    model = vision.model
    model.float().train().requires_grad_(True)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        scenes = S.generic_scenes(batch, seed=int(np.random.SeedSequence([seed, step, 3]).generate_state(1)[0]))
        scenes = [s for s in scenes if s.creatures]
        crops, identities = subject_crops(scenes, seed * 7919 + step)
        target = labels(identities)
        embeds = embed(vision, crops)
        loss = sum(F.cross_entropy(heads[name](embeds), target[name]) for name in S.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and step % 100 == 0:
            log(f"encoder step {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
    model.eval().requires_grad_(False)
    heads.eval().requires_grad_(False)
    facts = {"encoder": "trained on generic creatures' attributes (word, body, pattern, mark)", "encoder_seed": seed}
    facts["encoder_steps"], facts["encoder_loss"] = steps, float(np.mean(losses[-100:]))
    return facts, heads


@torch.no_grad()
def encoder_report(vision, heads: nn.ModuleDict, seed: int = 4242, count: int = 200) -> dict:
    """Attribute accuracy on generic creatures of fresh scenes, and how far apart HELD_OUT's
    photos land: the nearest held-out mean embedding is the photo's own for this share."""
    crops, identities = subject_crops([s for s in S.generic_scenes(count, seed) if s.creatures], seed)
    embeds, target = embed(vision, crops), labels(identities)
    report = {
        f"attr_{name}": float((heads[name](embeds).argmax(1) == target[name]).float().mean()) for name in S.ATTRIBUTES
    }
    photos = [S.photo(i, k)[0] for i in S.HELD_OUT for k in range(10)]
    crops, identities = subject_crops(photos, seed + 1)
    embeds = F.normalize(embed(vision, crops), dim=-1).view(len(S.HELD_OUT), 10, -1)
    refs = F.normalize(embeds[:, :5].mean(1), dim=-1)  # 5 reference photos each, judged on the other 5
    nearest = torch.einsum("ikd,jd->ikj", embeds[:, 5:], refs).argmax(-1)
    report["held_out_nearest_identity"] = float((nearest == torch.arange(len(S.HELD_OUT))[:, None]).float().mean())
    return report
