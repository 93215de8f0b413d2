"""The small world: a deterministic, seeded generator of captioned 32x32 scenes with ground truth.

No comfy here (numpy + torch only). Everything is a pure function of its seed.

World
- Backgrounds (`BACKGROUNDS`, index = background class): grass, sky, desert, night; each a colour
  with smooth large features only (a gradient; clouds; a dune; the moon): no per-pixel texture.
- Objects (`OBJECT_CLASSES` ball, box; `OBJECT_COLOURS` red, blue, yellow): small (radius 2-3 px),
  0-2 per scene, never overlapping a subject.
- Subjects: creatures of two words (`SUBJECT_WORDS` cat, dog: a round head with pointed ears and a
  raised tail vs a long head with a snout, a hanging ear and a stub tail), large and chunky (about
  three quarters of the image side; half in two-subject scenes). Appearance (`Identity`): word +
  body colour (`BODY_COLOURS`, 6) + colour layout (`PATTERNS`: the head, the belly and legs, or the
  rear half and tail in the mark colour) + mark colour (!= body): 90 per word. Identities differ in
  large colour regions, not fine outline or texture: what a 4 M-parameter prior can learn to draw
  in half an hour. `HELD_OUT` fixes 4 identities per word that the prior, the subject encoder and MoA's
  training data never see (`generic_identity` never returns them); `photo` renders any number
  of photos of one (pose = facing left/right and position, scale, light varied).
- Captions name what is drawn: the subjects by word (never their colours, as "a man" names no
  face), the objects with colour and class, and the background phrase (`BACKGROUND_PHRASES`):
  "a cat on grass", "a red ball and a dog in the desert", "a dog and a cat at night". The prior
  also learns from `described_caption`s, which sometimes describe a subject's colours ("an orange
  cat with a white head", as web captions describe what they show).

API
- `sample_scene(seed, *, identities=None, n_subjects=None, n_objects=None, background=None) -> Scene`;
  `identities` (a tuple of `Identity`, different words) fixes the subjects, else 0-2 generic ones.
- `render(scene) -> Render`: `image` float32 [3, 32, 32] in [0, 1], `subject_masks` bool [s, 32, 32]
  (visible pixels, in `scene.creatures` order), `object_masks` bool [o, 32, 32], `background` int.
- `photo(identity, seed) -> (Scene, Render)`: the creature alone on a random background.
- `generic_scenes(count, seed, min_subjects=0) -> list[Scene]`: the prior's data (scene i from
  seed (seed, i)); `render_batch(scenes) -> (images [b, 3, 32, 32], background [b])`.
- `write_folder(root, count, seed, two_subject_fraction=0.3) -> list[str]`: moa_train's "folder"
  layout (moa_train/data.py) of generic scenes with at least one subject: `<key>.png`, `<key>.txt`
  (caption), `<key>.<word>.png` (white where the subject is); returns the keys.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

WORLD_VERSION = 2  # bump when what a seed draws changes: cached priors are keyed by it
SIZE = 32
BACKGROUNDS = ("grass", "sky", "desert", "night")
BACKGROUND_PHRASES = {"grass": "on grass", "sky": "in the sky", "desert": "in the desert", "night": "at night"}
SUBJECT_WORDS = ("cat", "dog")
OBJECT_CLASSES = ("ball", "box")
OBJECT_COLOURS = {"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.95), "yellow": (1.0, 0.9, 0.1)}
BODY_COLOURS = {
    "orange": (0.95, 0.5, 0.1),
    "grey": (0.55, 0.55, 0.58),
    "brown": (0.45, 0.25, 0.1),
    "white": (0.97, 0.97, 0.95),
    "pink": (1.0, 0.55, 0.75),
    "teal": (0.05, 0.55, 0.6),
}
PATTERNS = ("head", "belly", "rear")


@dataclass(frozen=True)
class Identity:
    """What one subject looks like: its word, body colour, pattern and the pattern's colour."""

    word: str
    body: str
    pattern: str
    mark: str

    @property
    def name(self) -> str:
        return f"{self.body}-{self.pattern}-{self.mark}-{self.word}"


HELD_OUT = (
    Identity("cat", "orange", "rear", "white"),
    Identity("cat", "grey", "belly", "pink"),
    Identity("cat", "teal", "belly", "orange"),
    Identity("cat", "white", "head", "brown"),
    Identity("dog", "brown", "head", "white"),
    Identity("dog", "pink", "rear", "teal"),
    Identity("dog", "grey", "head", "orange"),
    Identity("dog", "white", "belly", "teal"),
)

ATTRIBUTES = {"word": SUBJECT_WORDS, "body": tuple(BODY_COLOURS), "pattern": PATTERNS, "mark": tuple(BODY_COLOURS)}
"""An identity's fields and the values each takes (what the subject encoder and the judges learn)."""


def attribute_indices(identity: Identity) -> tuple[int, ...]:
    """`identity`'s value of each of ATTRIBUTES, as indices into that attribute's values."""
    return tuple(values.index(getattr(identity, name)) for name, values in ATTRIBUTES.items())


"""The identities the prior, the subject encoder and MoA's training never see (the identity judge's classes)."""


@dataclass(frozen=True)
class Creature:
    identity: Identity
    x: float  # body centre, pixels
    y: float
    scale: float  # 1: body 15 px wide
    facing: int  # +1 head on the right, -1 on the left
    light: float  # brightness factor of its colours


@dataclass(frozen=True)
class Item:
    kind: str  # OBJECT_CLASSES
    colour: str  # OBJECT_COLOURS
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    background: str
    texture: int  # seed of the background's texture
    creatures: tuple[Creature, ...]
    items: tuple[Item, ...]
    caption: str


@dataclass(frozen=True)
class Render:
    image: torch.Tensor  # float32 [3, H, W] in [0, 1]
    subject_masks: torch.Tensor  # bool [s, H, W]
    object_masks: torch.Tensor  # bool [o, H, W]
    background: int  # index into BACKGROUNDS
    words: tuple[str, ...] = field(default=())  # the subjects' words, in subject_masks order


_Y, _X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def generic_identity(rng: np.random.Generator, word: str) -> Identity:
    """A random identity of `word` that is not HELD_OUT."""
    while True:
        body = rng.choice(list(BODY_COLOURS))
        mark = rng.choice([c for c in BODY_COLOURS if c != body])
        identity = Identity(word, str(body), str(rng.choice(PATTERNS)), str(mark))
        if identity not in HELD_OUT:
            return identity


def all_generic_identities() -> list[Identity]:
    """Every identity the prior may see (180 - 8)."""
    return [
        Identity(w, b, p, m)
        for w in SUBJECT_WORDS
        for b in BODY_COLOURS
        for p in PATTERNS
        for m in BODY_COLOURS
        if m != b and Identity(w, b, p, m) not in HELD_OUT
    ]


def _ellipse(cx, cy, rx, ry):
    return ((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 <= 1.0


def _triangle(apex, left, right):
    def side(a, b):
        return (b[0] - a[0]) * (_Y - a[1]) - (b[1] - a[1]) * (_X - a[0])

    s1, s2, s3 = side(apex, left), side(left, right), side(right, apex)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))


def _creature_parts(c: Creature) -> dict[str, np.ndarray]:
    """Boolean masks [H, W] of the creature's parts (all at least two pixels thick at scale 0.7)."""
    s, f, word = c.scale, c.facing, c.identity.word
    body = _ellipse(c.x, c.y, 7.5 * s, 5 * s)
    legs = np.zeros_like(body)
    for dx in (-5, -1.8, 1.8, 5):
        legs |= (np.abs(_X - (c.x + dx * s)) <= 1.3 * s) & (_Y >= c.y + 2 * s) & (_Y <= c.y + 8.5 * s)
    if word == "cat":
        hx, hy = c.x + f * 7 * s, c.y - 4.5 * s
        head = _ellipse(hx, hy, 4.3 * s, 4.3 * s)
        ears = np.zeros_like(body)
        for dx in (-2.4, 2.4):
            ex = hx + dx * s
            ears |= _triangle((ex, hy - 8 * s), (ex - 2.3 * s, hy - 2 * s), (ex + 2.3 * s, hy - 2 * s))
        tail = np.zeros_like(body)
        for t in np.linspace(0, 1, 8):  # a thick curve up from the back
            tx, ty = c.x - f * (7 + 2.5 * t) * s, c.y - (1 + 6.5 * t * t) * s
            tail |= _ellipse(tx, ty, 1.4 * s, 1.4 * s)
    else:
        hx, hy = c.x + f * 7.5 * s, c.y - 3.5 * s
        head = _ellipse(hx, hy, 5 * s, 3.8 * s) | _ellipse(hx + f * 4 * s, hy + 1.2 * s, 3 * s, 2.4 * s)
        ears = _ellipse(hx - f * 2.4 * s, hy + 1.8 * s, 1.9 * s, 3.6 * s)
        tail = _ellipse(c.x - f * 7.8 * s, c.y - 3 * s, 2.1 * s, 2.1 * s)
    return {"body": body, "legs": legs, "head": head, "ears": ears, "tail": tail, "eye": (hx + f * 1.7 * s, hy - 0.5)}


def _pattern(c: Creature, parts: dict) -> np.ndarray:
    """Where the mark colour goes: the head and ears, the belly and legs, or the rear half and tail."""
    pattern = c.identity.pattern
    if pattern == "head":
        return parts["head"] | parts["ears"]
    if pattern == "belly":
        return (parts["body"] & (_Y > c.y + 0.5 * c.scale)) | parts["legs"]
    return (parts["body"] & (c.facing * (_X - c.x) < 0)) | parts["tail"]


def _draw_creature(image: np.ndarray, c: Creature) -> np.ndarray:
    """Paint `c` onto image [H, W, 3] in place; returns its mask."""
    parts = _creature_parts(c)
    mask = parts["body"] | parts["legs"] | parts["head"] | parts["ears"] | parts["tail"]
    body = np.array(BODY_COLOURS[c.identity.body]) * c.light
    mark = np.array(BODY_COLOURS[c.identity.mark]) * c.light
    image[mask] = body
    image[_pattern(c, parts) & mask] = mark
    ex, ey = parts["eye"]
    ix, iy = int(np.clip(ex, 0, SIZE - 1)), int(np.clip(ey, 0, SIZE - 1))
    if mask[iy, ix]:
        image[iy, ix] = (0.05, 0.05, 0.05)
    return mask


def _item_mask(item: Item) -> np.ndarray:
    if item.kind == "ball":
        return _ellipse(item.x, item.y, item.radius, item.radius)
    return (np.abs(_X - item.x) <= item.radius) & (np.abs(_Y - item.y) <= item.radius)


def _draw_item(image: np.ndarray, item: Item) -> np.ndarray:
    mask = _item_mask(item)
    colour = np.array(OBJECT_COLOURS[item.colour])
    image[mask] = colour
    if item.kind == "box":
        inner = (np.abs(_X - item.x) <= item.radius - 1) & (np.abs(_Y - item.y) <= item.radius - 1)
        image[mask & ~inner] = colour * 0.55
    else:
        image[mask & _ellipse(item.x - 0.8, item.y - 0.8, 0.9, 0.9)] = np.minimum(colour + 0.5, 1.0)
    return mask


def _background(kind: str, texture: int) -> np.ndarray:
    """Smooth: a vertical gradient and at most a few large shapes, so that a small prior spends its
    capacity on the subjects rather than on per-pixel texture."""
    rng = np.random.default_rng(texture)
    t = (_Y / SIZE)[..., None]
    if kind == "grass":
        bright = rng.uniform(-0.04, 0.04)
        image = np.array((0.22, 0.58, 0.18)) + bright - t * np.array((0.06, 0.16, 0.04))
        horizon = _Y < rng.uniform(3, 7)
        image[horizon] = np.array((0.55, 0.78, 0.95))
    elif kind == "sky":
        image = np.array((0.3, 0.55, 0.95)) + t * np.array((0.35, 0.3, 0.05))
        for _ in range(rng.integers(1, 3)):
            cloud = _ellipse(rng.uniform(0, SIZE), rng.uniform(3, 12), rng.uniform(5, 8), rng.uniform(2.0, 3.0))
            image[cloud] = (0.96, 0.97, 1.0)
    elif kind == "desert":
        image = np.broadcast_to(np.array((0.93, 0.8, 0.5)), (SIZE, SIZE, 3)) - t * np.array((0.08, 0.08, 0.06))
        ridge = rng.uniform(10, 18) + 3.0 * np.sin(_X * 0.18 + rng.uniform(0, 2 * np.pi))
        image = np.where((_Y > ridge)[..., None], image * np.array((0.88, 0.82, 0.74)), image)
    else:
        image = np.array((0.05, 0.06, 0.22)) - t * np.array((0.01, 0.01, 0.1))
        moon = _ellipse(rng.uniform(4, 28), rng.uniform(3, 8), 2.6, 2.6)
        image[moon] = (0.97, 0.95, 0.75)
    return np.clip(image, 0, 1).astype(np.float32)


def render(scene: Scene) -> Render:
    """The scene's picture and ground truth. Objects first, creatures in order over them; every
    mask holds the pixels where its thing is visible."""
    image = _background(scene.background, scene.texture)
    objects = [_draw_item(image, item) for item in scene.items]
    subjects = [_draw_creature(image, c) for c in scene.creatures]
    for i in range(len(subjects)):  # later creatures cover earlier ones
        for later in subjects[i + 1 :]:
            subjects[i] = subjects[i] & ~later
    covered = np.zeros((SIZE, SIZE), bool)
    for mask in subjects:
        covered |= mask
    objects = [m & ~covered for m in objects]

    def stack(masks):
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, SIZE, SIZE, dtype=torch.bool)

    picture = torch.from_numpy(np.clip(image, 0, 1)).permute(2, 0, 1).contiguous().float()
    words = tuple(c.identity.word for c in scene.creatures)
    return Render(picture, stack(subjects), stack(objects), BACKGROUNDS.index(scene.background), words)


def _place_creatures(rng: np.random.Generator, identities: tuple[Identity, ...]) -> tuple[Creature, ...]:
    if len(identities) == 1:
        s = rng.uniform(0.9, 1.1)
        f = int(rng.choice((-1, 1)))
        centre = rng.uniform(13, 19)
        x = centre - f * 1.7 * s
        return (Creature(identities[0], x, rng.uniform(13, 18), s, f, rng.uniform(0.85, 1.1)),)
    creatures = []
    for i, identity in enumerate(identities):
        s = rng.uniform(0.62, 0.72)
        f = int(rng.choice((-1, 1)))
        centre = rng.uniform(7.5, 10.5) if i == 0 else rng.uniform(21.5, 24.5)
        creatures.append(Creature(identity, centre - f * 1.7 * s, rng.uniform(14, 19), s, f, rng.uniform(0.85, 1.1)))
    return tuple(creatures)


def _place_items(rng: np.random.Generator, creatures: tuple[Creature, ...], count: int) -> tuple[Item, ...]:
    blocked = np.zeros((SIZE, SIZE), bool)
    for c in creatures:
        parts = _creature_parts(c)
        blocked |= parts["body"] | parts["legs"] | parts["head"] | parts["ears"] | parts["tail"]
    blocked = _dilate(blocked)
    items = []
    for _ in range(count):
        for _attempt in range(30):
            r = rng.uniform(2.0, 3.0)
            item = Item(
                str(rng.choice(OBJECT_CLASSES)),
                str(rng.choice(list(OBJECT_COLOURS))),
                rng.uniform(r + 0.5, SIZE - r - 0.5),
                rng.uniform(r + 0.5, SIZE - r - 0.5),
                r,
            )
            mask = _item_mask(item)
            if not (mask & blocked).any():
                items.append(item)
                blocked |= _dilate(mask)
                break
    return tuple(items)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def make_caption(rng: np.random.Generator, background: str, creatures, items) -> str:
    """Subjects and objects in a random order, then the background phrase."""
    things = [f"a {c.identity.word}" for c in creatures] + [f"a {i.colour} {i.kind}" for i in items]
    order = rng.permutation(len(things))
    things = [things[k] for k in order]
    if not things:
        return BACKGROUND_PHRASES[background]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return f"{listed} {BACKGROUND_PHRASES[background]}"


def described_caption(scene: Scene, rng: np.random.Generator, share: float) -> str:
    """The scene's caption with each subject described by its colours with probability `share` ("an
    orange cat"), half of those with the colour layout too ("an orange cat with a white head"), as
    web captions sometimes describe what they show. The prior learns from these what the words of
    appearance look like; MoA's data and the evaluation keep the plain captions, where the subject
    photo is the only source of a subject's look."""
    caption = scene.caption
    for c in scene.creatures:
        if rng.random() >= share:
            continue
        identity = c.identity
        article = "an" if identity.body[0] in "aeiou" else "a"
        words = f"{article} {identity.body} {identity.word}"
        if rng.random() < 0.5:
            words += f" with a {identity.mark} {identity.pattern}"
        caption = caption.replace(f"a {identity.word}", words, 1)
    return caption


def sample_scene(
    seed: int,
    *,
    identities: tuple[Identity, ...] | None = None,
    n_subjects: int | None = None,
    n_objects: int | None = None,
    background: str | None = None,
) -> Scene:
    """A random scene. Without `identities`, `n_subjects` (default: 0, 1 or 2 at 10/55/35 %)
    generic creatures of different words; `n_objects` default 0, 1 or 2 at 50/35/15 %."""
    rng = np.random.default_rng(seed)
    if background is None:
        background = str(rng.choice(BACKGROUNDS))
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r}: the world has {', '.join(BACKGROUNDS)}")
    if identities is None:
        n = n_subjects if n_subjects is not None else int(rng.choice(3, p=(0.1, 0.55, 0.35)))
        words = list(rng.permutation(SUBJECT_WORDS)[:n])
        identities = tuple(generic_identity(rng, str(w)) for w in words)
    words = [i.word for i in identities]
    if len(identities) > 2 or len(set(words)) != len(words):
        raise ValueError(f"subjects {words}: at most two, of different words (MoA binds one word per subject)")
    n_obj = n_objects if n_objects is not None else int(rng.choice(3, p=(0.5, 0.35, 0.15)))
    creatures = _place_creatures(rng, tuple(identities)) if identities else ()
    items = _place_items(rng, creatures, n_obj)
    texture = int(rng.integers(2**31))
    return Scene(background, texture, creatures, items, make_caption(rng, background, creatures, items))


def photo(identity: Identity, seed: int) -> tuple[Scene, Render]:
    """One photo of `identity` alone: random background, pose, position, scale and light (photo
    `seed` of two identities differ: the seed is mixed with the identity's name)."""
    mixed = int(np.random.SeedSequence([seed, *identity.name.encode()]).generate_state(1)[0])
    scene = sample_scene(mixed, identities=(identity,), n_objects=0)
    return scene, render(scene)


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene `index` of a data set drawn with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generic_scenes(count: int, seed: int, min_subjects: int = 0, two_subject_fraction: float | None = None) -> list:
    """`count` scenes of generic creatures (never HELD_OUT); with `two_subject_fraction`, that share
    has two subjects and the rest one."""
    scenes = []
    for i in range(count):
        s = scene_seed(seed, i)
        n = None
        if two_subject_fraction is not None:
            n = 2 if np.random.default_rng(s + 1).random() < two_subject_fraction else 1
        scene = sample_scene(s, n_subjects=n)
        while len(scene.creatures) < min_subjects:
            s += 1_000_003
            scene = sample_scene(s, n_subjects=n)
        scenes.append(scene)
    return scenes


def render_batch(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [b, 3, 32, 32] and background classes [b]."""
    renders = [render(s) for s in scenes]
    return torch.stack([r.image for r in renders]), torch.tensor([r.background for r in renders])


def _png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def write_folder(root: str | Path, count: int, seed: int, two_subject_fraction: float = 0.3) -> list[str]:
    """`count` generic scenes with one or two subjects in moa_train's folder layout under `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, scene in enumerate(generic_scenes(count, seed, 1, two_subject_fraction)):
        key = f"world{i:06d}"
        r = render(scene)
        _png((r.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), root / f"{key}.png")
        (root / f"{key}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        for word, mask in zip(r.words, r.subject_masks, strict=True):
            _png(mask.numpy().astype(np.uint8) * 255, root / f"{key}.{word}.png")
        keys.append(key)
    return keys


def with_identities(scene: Scene, identities: tuple[Identity, ...]) -> Scene:
    """The same scene (layout, pose, caption) with other identities of the same words: subject swaps."""
    if [i.word for i in identities] != [c.identity.word for c in scene.creatures]:
        raise ValueError("with_identities: the new identities must have the scene's words, in its order")
    creatures = tuple(replace(c, identity=i) for c, i in zip(scene.creatures, identities, strict=True))
    return replace(scene, creatures=creatures)
