import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from comfyui_moa.moa_world import scenes as S

REPO = Path(__file__).resolve().parents[2]


def test_a_scene_and_its_render_are_the_same_for_a_seed_and_differ_across_seeds():
    a, b = S.sample_scene(7), S.sample_scene(7)
    assert a == b
    assert torch.equal(S.render(a).image, S.render(b).image)
    others = {S.sample_scene(seed).caption + str(S.sample_scene(seed).texture) for seed in range(20)}
    assert len(others) == 20
    images, _ = S.render_batch(S.generic_scenes(4, seed=3))
    again, _ = S.render_batch(S.generic_scenes(4, seed=3))
    assert torch.equal(images, again)
    assert not torch.equal(images, S.render_batch(S.generic_scenes(4, seed=4))[0])


def test_masks_hold_exactly_the_pixels_drawn_in_the_subjects_and_objects_colours():
    for seed in range(40):
        scene = S.sample_scene(seed, n_subjects=2, n_objects=2)
        r = S.render(scene)
        assert r.subject_masks.shape[0] == len(scene.creatures) == 2
        assert r.object_masks.shape[0] == len(scene.items)
        assert not (r.subject_masks[0] & r.subject_masks[1]).any()
        assert all(m.sum() > 20 for m in r.subject_masks)  # large subjects
        everything = r.subject_masks.any(0) | r.object_masks.any(0)
        assert not (r.subject_masks.any(0) & r.object_masks.any(0)).any()
        bare = S.render(S.Scene(scene.background, scene.texture, (), (), ""))
        # outside every mask the picture is the bare background, inside a mask it differs somewhere
        assert torch.equal(r.image[:, ~everything], bare.image[:, ~everything])
        for mask in [*r.subject_masks, *r.object_masks]:
            assert (r.image[:, mask] != bare.image[:, mask]).any()
        for item, mask in zip(scene.items, r.object_masks, strict=True):
            colour = torch.tensor(S.OBJECT_COLOURS[item.colour])
            assert (r.image[:, mask].T == colour).all(1).any()


def test_held_out_identities_are_never_generic():
    assert len(set(S.HELD_OUT)) == 8 and {i.word for i in S.HELD_OUT} == set(S.SUBJECT_WORDS)
    generic = S.all_generic_identities()
    assert not set(generic) & set(S.HELD_OUT) and len(generic) == 2 * 6 * 3 * 5 - 8
    seen = {c.identity for scene in S.generic_scenes(3000, seed=0) for c in scene.creatures}
    assert not seen & set(S.HELD_OUT)
    assert len(seen) == len(generic)  # and the generic draw covers the rest


def test_captions_name_every_subject_and_object_drawn_and_the_background():
    for seed in range(60):
        scene = S.sample_scene(seed)
        words = scene.caption.replace(",", "").split()
        assert scene.caption.endswith(S.BACKGROUND_PHRASES[scene.background])
        for c in scene.creatures:
            assert words.count(c.identity.word) == 1
            assert c.identity.body not in words  # subjects are named by word only
        for item in scene.items:
            assert f"{item.colour} {item.kind}" in scene.caption
        things = sum(scene.caption.count(f"a {x}") for x in (*S.SUBJECT_WORDS, *S.OBJECT_COLOURS))
        assert things == len(scene.creatures) + len(scene.items)


def test_photos_of_an_identity_vary_pose_scale_and_light_but_keep_its_colours():
    identity = S.HELD_OUT[0]
    scenes = [S.photo(identity, k)[0] for k in range(12)]
    assert all(s.creatures[0].identity == identity and not s.items for s in scenes)
    assert len({s.creatures[0].facing for s in scenes}) == 2
    assert np.ptp([s.creatures[0].scale for s in scenes]) > 0.1
    assert np.ptp([s.creatures[0].light for s in scenes]) > 0.1
    assert S.photo(S.HELD_OUT[1], 0)[0].creatures[0].x != scenes[0].creatures[0].x  # seeds mixed per identity
    assert S.photo(identity, 3)[0] == scenes[3]


def test_write_folder_is_read_by_moa_trains_folder_layout(tmp_path):
    code = (
        "import sys; from pathlib import Path; import moa_pack; moa_pack.load(); "
        "from comfyui_moa.moa_train.data import FolderLayout, read_record; "
        f"layout = FolderLayout(Path({str(tmp_path)!r})); "
        "recs = [layout.record(i) for i in range(len(layout))]; "
        "print(len(recs), sum(len(r.subjects) for r in recs), "
        "sum(int(read_record(r)[1].sum()) for r in recs))"
    )
    keys = S.write_folder(tmp_path, 10, seed=5, two_subject_fraction=0.5)
    assert len(keys) == 10
    scenes = S.generic_scenes(10, 5, 1, 0.5)
    subjects = sum(len(s.creatures) for s in scenes)
    pixels = sum(int(S.render(s).subject_masks.sum()) for s in scenes)
    # moa_train's reader imports nothing of comfy, but run it in a child to keep this test's imports plain
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(10), str(subjects), str(pixels)]
    assert (tmp_path / f"{keys[0]}.txt").read_text().strip() == scenes[0].caption


def test_scenes_import_no_comfy():
    code = (
        "import sys, moa_pack; moa_pack.module('moa_world.scenes'); "
        "print(any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
