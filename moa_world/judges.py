"""Held-out judges of the small world: small CNNs trained on the generator's ground truth only
(never on model samples), which score real and generated images alike. Plain torch, no comfy.

- `SceneJudge` on whole images [b, 3, 32, 32] in [0, 1]: the background class (4), which object
  (class, colour) pairs are present (6, multi-label) and which subject words (2, multi-label).
- `Segmenter`: per pixel background / cat / dog / object; `subject_masks` gives the cat and dog
  masks [b, 2, H, W] (what MoA's subject region is measured against in generated images).
- `IdentityJudge` on a subject's crop (`subject_crop`: the mask's box, black outside the mask,
  padded square, 24 px): its word, body colour, colour layout and mark colour (scenes.ATTRIBUTES), learnt
  on every creature; the identity is the scenes.HELD_OUT one (8; chance 1/8, 1/4 within a word)
  whose attributes are likeliest.

`Judges.load(folder)` / `Judges.save(folder)` (judges.safetensors); `train_judges(seed, steps)`
trains all three (on scenes of generic and held-out creatures, every background) and
`judge_report(judges, seed)` measures them on fresh real images. Predictions:
`background(images) -> [b]`, `objects(images) -> bool [b, 2, 3]` (class x colour),
`words(images) -> bool [b, 2]`, `subject_masks(images) -> bool [b, 2, H, W]`,
`identity(images, masks) -> [b]` (index into HELD_OUT; masks bool [b, H, W], None: the whole image),
`attributes(images, masks) -> [b, 4]` (indices into scenes.ATTRIBUTES' values).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import scenes as S

CROP = 24
SEG_CLASSES = ("background", "cat", "dog", "object")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class SceneJudge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(3, 16, 2), _block(16, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 64),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(256, len(S.BACKGROUNDS) + len(S.OBJECT_CLASSES) * len(S.OBJECT_COLOURS) + 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = _block(3, 16)
        self.mid = nn.Sequential(_block(16, 32, 2), _block(32, 32), _block(32, 32))
        self.up = nn.Sequential(_block(48, 16), nn.Conv2d(16, len(SEG_CLASSES), 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.down(images * 2 - 1)
        y = F.interpolate(self.mid(x), scale_factor=2, mode="nearest")
        return self.up(torch.cat([x, y], 1))


HEAD_SIZES = [len(values) for values in S.ATTRIBUTES.values()]  # the identity judge's heads
HELD_OUT_ATTRIBUTES = torch.tensor([S.attribute_indices(i) for i in S.HELD_OUT])  # [8, 4]


class IdentityJudge(nn.Module):
    """A subject's attributes (one head each), learnt from every creature the generator draws, generic
    and held-out: an identity is the held-out one whose attributes explain the crop best, so a subject
    is judged by what it shows (its colours and their layout), not by cues that happen to separate
    eight classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _block(3, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 64),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, sum(HEAD_SIZES)),
        )  # fmt: skip

    def forward(self, crops: torch.Tensor) -> list[torch.Tensor]:
        """Per attribute, log-probabilities [b, values]."""
        logits = self.net(crops * 2 - 1).split(HEAD_SIZES, dim=1)
        return [F.log_softmax(x, dim=1) for x in logits]

    def held_out_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """[b, 8]: each held-out identity's summed attribute log-probability."""
        logp = self(crops)
        return sum(lp[:, HELD_OUT_ATTRIBUTES[:, k]] for k, lp in enumerate(logp))


def subject_crop(images: torch.Tensor, masks: torch.Tensor | None, size: int = CROP) -> torch.Tensor:
    """images [b, 3, H, W], masks bool [b, H, W] -> [b, 3, size, size]: each mask's box, black
    outside the mask, padded square (an empty mask gives the whole image)."""
    out = []
    for i in range(images.shape[0]):
        image = images[i]
        if masks is not None and masks[i].any():
            m = masks[i]
            rows, cols = m.any(1).nonzero()[:, 0], m.any(0).nonzero()[:, 0]
            image = (image * m)[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        h, w = image.shape[-2:]
        side = max(h, w)
        image = F.pad(image, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
        out.append(F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)


@dataclass(frozen=True)
class Truth:
    """Ground truth of a batch of real renders."""

    images: torch.Tensor  # [b, 3, H, W]
    background: torch.Tensor  # [b]
    objects: torch.Tensor  # bool [b, 2, 3]
    words: torch.Tensor  # bool [b, 2]
    segments: torch.Tensor  # [b, H, W] index into SEG_CLASSES
    identity: torch.Tensor  # [b] index into HELD_OUT of the first subject, -1 if generic
    first_mask: torch.Tensor  # bool [b, H, W] the held-out subject's mask, else the first subject's
    attributes: torch.Tensor  # [b, 4] that subject's scenes.attribute_indices, -1 where there is no subject


def truth(scenes: list[S.Scene]) -> Truth:
    renders = [S.render(s) for s in scenes]
    b = len(scenes)
    objects = torch.zeros(b, len(S.OBJECT_CLASSES), len(S.OBJECT_COLOURS), dtype=torch.bool)
    words = torch.zeros(b, len(S.SUBJECT_WORDS), dtype=torch.bool)
    segments = torch.zeros(b, S.SIZE, S.SIZE, dtype=torch.long)
    identity = torch.full((b,), -1)
    attributes = torch.full((b, len(S.ATTRIBUTES)), -1)
    first = torch.zeros(b, S.SIZE, S.SIZE, dtype=torch.bool)
    colours = list(S.OBJECT_COLOURS)
    for i, (scene, r) in enumerate(zip(scenes, renders, strict=True)):
        for item, mask in zip(scene.items, r.object_masks, strict=True):
            if mask.any():
                objects[i, S.OBJECT_CLASSES.index(item.kind), colours.index(item.colour)] = True
                segments[i][mask] = 3
        for k, (c, mask) in enumerate(zip(scene.creatures, r.subject_masks, strict=True)):
            words[i, S.SUBJECT_WORDS.index(c.identity.word)] = True
            segments[i][mask] = 1 + S.SUBJECT_WORDS.index(c.identity.word)
            if c.identity in S.HELD_OUT:
                identity[i] = S.HELD_OUT.index(c.identity)
            elif k > 0 or identity[i] >= 0:
                continue
            first[i], attributes[i] = mask, torch.tensor(S.attribute_indices(c.identity))
    images = torch.stack([r.image for r in renders])
    background = torch.tensor([r.background for r in renders])
    return Truth(images, background, objects, words, segments, identity, first, attributes)


def judge_scenes(count: int, seed: int) -> list[S.Scene]:
    """The judges' data: scene seeds disjoint from the prior's (its seeds come through scene_seed);
    a third of them show a held-out identity, alone or beside a generic creature of the other word
    (on either side)."""
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i, 7])
        s = int(rng.integers(2**62))
        if rng.random() < 1 / 3:
            held = S.HELD_OUT[int(rng.integers(len(S.HELD_OUT)))]
            ids = (held,)
            if rng.random() < 0.35:
                other = S.generic_identity(rng, next(w for w in S.SUBJECT_WORDS if w != held.word))
                ids = (held, other) if rng.random() < 0.5 else (other, held)
            out.append(S.sample_scene(s, identities=ids))
        else:
            out.append(S.sample_scene(s))
    return out


class Judges:
    def __init__(self, scene: SceneJudge, segmenter: Segmenter, identity_judge: IdentityJudge, facts: dict) -> None:
        self.scene, self.segmenter, self.identity_judge, self.facts = scene, segmenter, identity_judge, facts
        for m in (scene, segmenter, identity_judge):
            m.eval().requires_grad_(False)

    @torch.no_grad()
    def _scene(self, images: torch.Tensor) -> torch.Tensor:
        return self.scene(images.float())

    def background(self, images: torch.Tensor) -> torch.Tensor:
        return self._scene(images)[:, : len(S.BACKGROUNDS)].argmax(1)

    def objects(self, images: torch.Tensor) -> torch.Tensor:
        n = len(S.BACKGROUNDS)
        logits = self._scene(images)[:, n : n + len(S.OBJECT_CLASSES) * len(S.OBJECT_COLOURS)]
        return (logits > 0).view(-1, len(S.OBJECT_CLASSES), len(S.OBJECT_COLOURS))

    def words(self, images: torch.Tensor) -> torch.Tensor:
        return self._scene(images)[:, -2:] > 0

    @torch.no_grad()
    def segments(self, images: torch.Tensor) -> torch.Tensor:
        return self.segmenter(images.float()).argmax(1)

    def subject_masks(self, images: torch.Tensor) -> torch.Tensor:
        seg = self.segments(images)
        return torch.stack([seg == 1, seg == 2], 1)

    @torch.no_grad()
    def identity(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """[b]: index into HELD_OUT of the subject in `masks` (None: the whole image)."""
        return self.identity_judge.held_out_scores(subject_crop(images.float(), masks)).argmax(1)

    @torch.no_grad()
    def attributes(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """[b, 4]: the subject's scenes.ATTRIBUTES indices (word, body colour, layout, mark colour)."""
        return torch.stack([lp.argmax(1) for lp in self.identity_judge(subject_crop(images.float(), masks))], 1)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, m in (("scene", self.scene), ("segmenter", self.segmenter), ("identity", self.identity_judge)):
            state.update({f"{name}.{k}": v.contiguous() for k, v in m.state_dict().items()})
        save_file(state, folder / "judges.safetensors", {"format": "moa-world-judges", "version": "2"})
        (folder / "judges.json").write_text(json.dumps(self.facts, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "Judges":
        folder = Path(folder)
        if not (folder / "judges.safetensors").is_file():
            raise ValueError(f"{folder}: no judges.safetensors; train them with `python -m moa_world judges`")
        state = load_file(folder / "judges.safetensors")
        modules = {"scene": SceneJudge(), "segmenter": Segmenter(), "identity": IdentityJudge()}
        for name, m in modules.items():
            m.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
        facts = json.loads((folder / "judges.json").read_text()) if (folder / "judges.json").is_file() else {}
        return cls(modules["scene"], modules["segmenter"], modules["identity"], facts)


def _jitter_mask(mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Grow or shrink masks [b, H, W] by a pixel at random: segmenter masks are never exact."""
    m = mask[:, None].float()
    choice = rng.integers(3)
    if choice == 1:
        m = F.max_pool2d(m, 3, 1, 1)
    elif choice == 2:
        m = -F.max_pool2d(-m, 3, 1, 1)
    return m[:, 0] > 0.5


def train_judges(seed: int = 0, steps: int = 800, batch: int = 48, log=None) -> Judges:
    """All three judges on fresh ground-truth batches (deterministic for a seed)."""
    torch.manual_seed(seed)
    scene, seg, ident = SceneJudge(), Segmenter(), IdentityJudge()
    params = [*scene.parameters(), *seg.parameters(), *ident.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    n = len(S.BACKGROUNDS)
    for step in range(steps):
        rng = np.random.default_rng([seed, step, 11])
        t = truth(judge_scenes(batch, seed * 1_000_003 + step))
        images = (t.images * torch.from_numpy(rng.uniform(0.9, 1.1, (batch, 1, 1, 1))).float()).clamp(0, 1)
        images = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(step))).clamp(0, 1)
        out = scene(images)
        loss = F.cross_entropy(out[:, :n], t.background)
        loss = loss + F.binary_cross_entropy_with_logits(out[:, n:-2], t.objects.flatten(1).float())
        loss = loss + F.binary_cross_entropy_with_logits(out[:, -2:], t.words.float())
        loss = loss + F.cross_entropy(seg(images), t.segments)
        subject = t.attributes[:, 0] >= 0
        if subject.any():
            crops = subject_crop(images[subject], _jitter_mask(t.first_mask[subject], rng))
            for logp, target in zip(ident(crops), t.attributes[subject].unbind(1), strict=True):
                loss = loss + F.nll_loss(logp, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log and step % 100 == 0:
            log(f"judges step {step}/{steps} loss {loss.item():.4f}")
    return Judges(scene, seg, ident, {"seed": seed, "steps": steps, "batch": batch})


def judge_report(judges: Judges, seed: int = 12345, count: int = 512) -> dict:
    """The judges' accuracy on fresh real images (seeds none of their training used)."""
    t = truth(judge_scenes(count, seed))
    seg = judges.segments(t.images)
    masks = judges.subject_masks(t.images)
    held = t.identity >= 0
    first_word = t.segments.new_tensor([0] * count)
    for i in range(count):
        first_word[i] = int(t.segments[i][t.first_mask[i]].max()) if t.first_mask[i].any() else 0
    predicted_first = torch.stack([masks[i, max(w - 1, 0)] for i, w in enumerate(first_word.tolist())])
    inter = (predicted_first & t.first_mask).sum((1, 2)).float()
    union = (predicted_first | t.first_mask).sum((1, 2)).float().clamp(min=1)
    has = t.first_mask.any((1, 2))
    found = judges.attributes(t.images[held], t.first_mask[held])
    attributes_right = (found == t.attributes[held]).float().mean(0)
    return {
        "images": count,
        "background": float((judges.background(t.images) == t.background).float().mean()),
        "objects_exact": float((judges.objects(t.images) == t.objects).flatten(1).all(1).float().mean()),
        "words_exact": float((judges.words(t.images) == t.words).all(1).float().mean()),
        "segment_pixels": float((seg == t.segments).float().mean()),
        "subject_iou": float((inter / union)[has].mean()),
        "identity_true_mask": float(
            (judges.identity(t.images[held], t.first_mask[held]) == t.identity[held]).float().mean()
        ),
        "identity_segmenter_mask": float(
            (judges.identity(t.images[held], predicted_first[held]) == t.identity[held]).float().mean()
        ),
        "identity_images": int(held.sum()),
        **{f"attribute_{name}": float(right) for name, right in zip(S.ATTRIBUTES, attributes_right, strict=True)},
    }
