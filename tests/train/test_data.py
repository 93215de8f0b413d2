"""Training data: both layouts, bad samples, subject crops, dropout, and the sample order that makes
one process and many (and resumed runs) see the same samples."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_moa.moa_core import DataError


@pytest.fixture(scope="module")
def binder(models):
    from moa_train.samples import CaptionBinder

    return CaptionBinder(models.clip)


def samples_of(root, binder, global_batch=4, **data):
    from moa_train.config import DataSettings
    from moa_train.data import open_layout
    from moa_train.samples import TrainingSamples

    settings = DataSettings(**{"layout": "folder", "resolution": 64, "subject_resolution": 32, **data})
    return TrainingSamples(
        open_layout(settings.layout, root, "train", settings.object_types), settings, 7, global_batch, binder
    )


def write_ffhq_wild(root: Path, source: Path) -> Path:
    """FastComposer's layout from synthetic samples: <id[:5]>/<id>.jpg/.json/.npy, image_ids_train.txt."""
    ids = []
    for n, caption_file in enumerate(sorted(source.glob("s*.txt"))[:3]):
        key = f"{70000 + n:05d}"
        folder = root / key[:5]
        folder.mkdir(parents=True, exist_ok=True)
        caption = caption_file.read_text()
        masks = sorted(source.glob(f"{caption_file.stem}.*.png"))
        ids_map = np.zeros(np.asarray(Image.open(masks[0])).shape, dtype=np.int32)
        segments = []
        for i, mask_file in enumerate(masks, start=1):
            word = mask_file.name.split(".")[1]
            ids_map[np.asarray(Image.open(mask_file)) > 127] = i * 10
            occurrence = int(mask_file.name.split(".")[2]) - 1 if mask_file.name.count(".") == 3 else 0
            starts = [j for j in range(len(caption)) if caption.startswith(word, j)]
            end = starts[occurrence] + len(word)
            segments.append({"id": i * 10, "bbox": [0, 0, 1, 1], "end": end, "coco_label": "person"})
        ids_map[:4, :4] = 99  # a segment of another kind, to be left out
        segments.append({"id": 99, "bbox": [0, 0, 4, 4], "end": len(caption), "coco_label": "dog"})
        (folder / f"{key}.json").write_text(json.dumps({"caption": caption, "segments": segments}))
        np.save(folder / f"{key}.npy", ids_map)
        Image.open(caption_file.with_suffix(".jpg")).save(folder / f"{key}.jpg")
        ids.append(key)
    (root / "image_ids_train.txt").write_text("\n".join(ids) + "\n")
    return root


def test_folder_layout_binds_each_mask_to_its_word_and_occurrence(data_dirs):
    from moa_train.data import FolderLayout

    layout = FolderLayout(data_dirs[0])
    records = {layout.captions[i].stem: i for i in range(len(layout))}
    twice = next(key for key in records if len(list(data_dirs[0].glob(f"{key}.box.*.png"))) == 2)
    record = layout.record(records[twice])
    assert [(s.word, s.occurrence) for s in record.subjects] == [("box", 0), ("box", 1)]
    assert record.caption.startswith("a photo of a box and a box")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("zz_wrong_word", "'giraffe' of zz_wrong_word.giraffe.png is not in the caption"),
        ("zz_no_mask", "no subject mask"),
    ],
)
def test_bad_folder_samples_say_what_is_wrong(data_dirs, key, message):
    from moa_train.data import FolderLayout

    layout = FolderLayout(data_dirs[0])
    index = [c.stem for c in layout.captions].index(key)
    with pytest.raises(DataError, match=message):
        layout.record(index)


def test_bad_samples_are_skipped_counted_and_replaced_by_the_next_good_one(data_dirs, binder, caplog):
    samples = samples_of(data_dirs[0], binder)
    examples = [samples[g] for g in range(len(samples))]
    assert sum(e.skipped for e in examples) == 2
    assert not {e.key for e in examples} & {"zz_wrong_word", "zz_no_mask"}
    assert sum("skipping a training sample" in r.message for r in caplog.records) == 2  # each reported once


def test_ffhq_wild_layout_reads_words_at_segment_ends_and_panoptic_masks(data_dirs, binder, tmp_path):
    from moa_train.data import FfhqWild, read_record

    root = write_ffhq_wild(tmp_path / "ffhq", data_dirs[0])
    layout = FfhqWild(root, "train", ("person",))
    record = layout.record(0)
    assert {s.word for s in record.subjects} <= {"ball", "box"}  # the "dog" segment is not a subject
    image, masks = read_record(record)
    assert masks.shape == (len(record.subjects), *image.shape[-2:]) and bool(masks.any((1, 2)).all())
    example = samples_of(root, binder, layout="ffhq-wild")[0]
    assert example.key in layout.ids and example.skipped == 0


def test_ffhq_wild_files_that_need_pickle_or_miss_their_word_are_skipped(data_dirs, tmp_path):
    from moa_train.data import FfhqWild, read_record

    root = write_ffhq_wild(tmp_path / "ffhq", data_dirs[0])
    layout = FfhqWild(root, "train", ("person",))
    np.save(root / "70000" / "70000.npy", np.array([{"not": "an id map"}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="unreadable segment map"):
        read_record(layout.record(0))
    info = json.loads((root / "70001" / "70001.json").read_text())
    for end, message in ((3, "'p' is not a whole word"), (10_000, "ends at character 10000, where the caption")):
        info["segments"][0]["end"] = end  # 3: inside "a photo"; 10000: past the caption
        (root / "70001" / "70001.json").write_text(json.dumps(info))
        with pytest.raises(DataError, match=message):
            layout.record(1)
    with pytest.raises(DataError, match="image_ids_test.txt"):
        FfhqWild(root, "test", ("person",))


def test_a_sample_is_the_same_whatever_process_or_batch_split_reads_it(data_dirs, binder):
    from moa_train.samples import StepBatches

    first, second = samples_of(data_dirs[0], binder), samples_of(data_dirs[0], binder)
    for g in (0, 5, 13):
        a, b = first[g], second[g]
        assert a.key == b.key and a.conditioned == b.conditioned and a.noise_seed == b.noise_seed
        assert torch.equal(a.image, b.image) and torch.equal(a.crops, b.crops) and torch.equal(a.masks, b.masks)
    one = list(StepBatches(0, 3, batch=4, accum=1, rank=0, world=1))
    two = [list(StepBatches(0, 3, batch=2, accum=1, rank=r, world=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*two, strict=True)] == one
    accumulated = list(StepBatches(0, 3, batch=2, accum=2, rank=0, world=1))
    assert [a + b for a, b in zip(accumulated[::2], accumulated[1::2], strict=True)] == one


def test_conditioning_dropout_follows_its_probabilities(data_dirs, binder):
    samples = samples_of(data_dirs[0], binder, augment=False, uncondition_prob=0.3, subject_keep_prob=0.5)
    examples = [samples[g] for g in range(240)]
    unconditioned = [e for e in examples if e.binding.length and not e.binding.positions and not e.conditioned]
    empty_caption = [e for e in examples if e.binding.tokens == binder("", [], []).tokens]
    assert 0.2 < len(empty_caption) / len(examples) < 0.4
    assert {id(e) for e in empty_caption} <= {id(e) for e in unconditioned}
    kept = [len(e.conditioned) / len(e.masks) for e in examples if e not in empty_caption]
    assert 0.4 < sum(kept) / len(kept) < 0.6
    assert all(len(e.masks) >= 1 for e in examples)  # dropped subjects keep their masks for the losses


def test_subject_crop_fills_the_background_with_noise_and_cuts_the_mask_box():
    from moa_train.images import seeded, subject_crop

    image = torch.full((3, 10, 12), 7, dtype=torch.uint8)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True
    mask[4, 3] = False
    with seeded(0):
        crop = subject_crop(image, mask)
    assert crop.shape == (3, 3, 6)
    assert bool((crop[:, :2] == 7).all()) and crop[:, 2, 0].tolist() != [7, 7, 7]


def test_target_transform_centre_crops_landscapes_and_pads_portraits():
    from moa_train.images import fit_square

    landscape = torch.zeros(3, 20, 40, dtype=torch.uint8)
    landscape[:, :, :10] = 255  # the left quarter is cut away by the centre crop
    image, masks = fit_square(landscape, torch.ones(1, 20, 40, dtype=torch.bool), 20, flip=False)
    assert image.shape == (3, 20, 20) and float(image.max()) == 0.0 and bool((masks == 1).all())
    portrait = torch.full((3, 40, 20), 255, dtype=torch.uint8)
    image, masks = fit_square(portrait, torch.ones(1, 40, 20, dtype=torch.bool), 20, flip=False)
    assert image.shape == (3, 20, 20)
    assert float(image[:, :, 0].max()) == 0.0 and float(image[:, :, 10].min()) == 1.0  # black side bars
    assert float(masks[0, :, 0].max()) == 0.0  # the bars are background


def test_collate_lays_every_token_of_a_subject_word_on_its_subject(data_dirs, binder):
    from moa_train.samples import collate

    samples = samples_of(data_dirs[0], binder, uncondition_prob=0.0, subject_keep_prob=1.0)
    examples = [samples[g] for g in range(4)]
    batch = collate(examples)
    for row, example in enumerate(examples):
        expected = sorted(
            (p, s) for s, ps in zip(example.conditioned, example.binding.positions, strict=True) for p in ps
        )
        used = batch.subjects[row] >= 0
        found = sorted(zip(batch.positions[row][used].tolist(), batch.subjects[row][used].tolist(), strict=True))
        assert found == expected
    assert batch.crops.shape[0] == len(batch.crop_rows) == sum(len(e.conditioned) for e in examples)


def test_an_unreadable_image_is_a_bad_sample(data_dirs, tmp_path):
    import shutil

    from moa_train.data import FolderLayout, read_record

    for path in data_dirs[0].glob("s0_0000.*"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "s0_0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="s0_0000.jpg: unreadable image"):
        read_record(FolderLayout(tmp_path).record(0))


def test_at_most_max_subjects_are_taken_from_an_image(data_dirs, binder):
    samples = samples_of(data_dirs[0], binder, max_subjects=1, uncondition_prob=0.0, subject_keep_prob=1.0)
    examples = [samples[g] for g in range(12)]
    assert all(len(e.masks) == 1 and e.conditioned == (0,) for e in examples)
