"""Tests of the input pipelines: folder/list/imagenet2012 sources, sharding, resume, bad images."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tame_jax import data

SIZE, RESIZE = 32, 36
# (split, class, file name, (height, width)); classes sorted: cat -> 0, dog -> 1.
FILES = [
    ("train", "cat", "a.png", (40, 60)),
    ("train", "cat", "b.jpg", (50, 50)),
    ("train", "cat", "c.png", (33, 47)),
    ("train", "dog", "d.jpeg", (64, 45)),
    ("train", "dog", "e.png", (36, 36)),
    ("train", "dog", "f.JPG", (41, 70)),
    ("validation", "cat", "g.png", (45, 61)),
    ("validation", "cat", "h.jpg", (38, 52)),
    ("validation", "dog", "i.png", (70, 37)),
    ("validation", "dog", "j.png", (36, 40)),
    ("validation", "dog", "k.jpg", (44, 44)),
]


def _write(path: str, hw: tuple[int, int], seed: int) -> np.ndarray:
    """Writes a smooth random RGB image (PNG or JPEG by extension); returns its pixels."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize(hw[::-1], Image.BILINEAR))
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "PNG" if path.lower().endswith(".png") else "JPEG"
    Image.fromarray(img).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return img


def _config(**data_kwargs) -> ml_collections.ConfigDict:
    """Returns a config with a data sub-dict of small images."""
    d = dict(
        source="folder",
        data_dir="",
        manual_dir="",
        root="",
        list_file="",
        train_split="train",
        eval_split="validation",
        image_size=SIZE,
        resize_size=RESIZE,
        on_bad_image="skip",
        shuffle_buffer=16,
        num_parallel_calls=2,
    )
    d.update(data_kwargs)
    return ml_collections.ConfigDict({"data": d})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """Returns the root of a tiny image folder with train and validation splits."""
    root = str(tmp_path_factory.mktemp("folder"))
    for i, (split, cls, name, hw) in enumerate(FILES):
        _write(os.path.join(root, split, cls, name), hw, seed=i)
    return root


def _take(it, n: int) -> list[dict]:
    """Returns the next n batches of an iterator."""
    return [next(it) for _ in range(n)]


def _pil_eval(path: str) -> np.ndarray:
    """Returns torchvision-style Resize(RESIZE) + CenterCrop(SIZE) of a file, by PIL, in [0, 1]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if h <= w:
        nh, nw = RESIZE, int(RESIZE * w / h)
    else:
        nh, nw = int(RESIZE * h / w), RESIZE
    img = np.asarray(img.resize((nw, nh), Image.BILINEAR), np.float32) / 255.0
    top, left = int(round((nh - SIZE) / 2.0)), int(round((nw - SIZE) / 2.0))
    return img[top : top + SIZE, left : left + SIZE]


def test_folder_eval_labels_padding_and_centre_crop(folder):
    cfg = _config(root=folder)
    info = data.get_dataset_info(cfg)
    assert info == data.DatasetInfo(2, 6, 5, SIZE)
    batches = list(data.eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 2
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)
    labels = np.concatenate([b["label"] for b in batches])[:5]
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])  # cat: g, h; dog: i, j, k
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.all(images[5:] == 0.0)  # padding
    # Against an independent PIL resize + crop (PIL rounds to uint8: up to 1/255 apart; a crop
    # one pixel off gives mean 0.03, max 0.13 on these images).
    for row, name in [(2, "dog/i.png"), (0, "cat/g.png"), (1, "cat/h.jpg")]:
        ref = _pil_eval(os.path.join(folder, "validation", name))
        diff = np.abs(images[row] - ref)
        assert diff.mean() < 0.002 and diff.max() < 0.006, (name, diff.mean(), diff.max())


def test_list_source_follows_list_order_and_labels(folder, tmp_path):
    lines = ["dog/j.png 7", "cat/h.jpg 3", "# comment", "", "dog/i.png 7"]
    list_file = tmp_path / "val.txt"
    list_file.write_text("\n".join(lines))
    cfg = _config(source="list", root=os.path.join(folder, "validation"), list_file=str(list_file))
    assert data.get_dataset_info(cfg).num_classes == 8  # max label + 1 unless num_classes set
    (batch,) = list(data.eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["label"][:3], [7, 3, 7])
    np.testing.assert_array_equal(batch["valid"], [True, True, True, False])
    folder_batches = list(
        data.eval_iterator(_config(root=folder), global_batch_size=8, process_count=1,
                           process_index=0)  # fmt: skip
    )
    by_folder = folder_batches[0]["image"]  # g, h, i, j, k
    np.testing.assert_array_equal(batch["image"][:3], by_folder[[3, 1, 2]])


def test_shards_are_disjoint_and_cover(folder):
    cfg = _config(root=folder)
    per_host = [
        list(data.eval_iterator(cfg, global_batch_size=4, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) == 2  # hosts have 3 and 2 examples, local batch 2
    assert not per_host[1][1]["valid"].any()  # host 1's extra batch is all padding
    keys = [
        {b["image"][j].tobytes() for b in host for j in np.flatnonzero(b["valid"])}
        for host in per_host
    ]
    assert len(keys[0]) == 3 and len(keys[1]) == 2 and not keys[0] & keys[1]
    (whole,) = list(data.eval_iterator(cfg, global_batch_size=8, process_index=0, process_count=1))
    assert keys[0] | keys[1] == {whole["image"][j].tobytes() for j in range(5)}
    # Each example carries its index in the split, whatever the number of hosts (-1: padding).
    by_index = {int(i): whole["image"][j].tobytes() for j, i in enumerate(whole["index"][:5])}
    assert sorted(by_index) == list(range(5)) and (whole["index"][5:] == -1).all()
    for host in per_host:
        for b in host:
            assert (b["index"][~b["valid"]] == -1).all()
            for j in np.flatnonzero(b["valid"]):
                assert b["image"][j].tobytes() == by_index[int(b["index"][j])]
    # Train shards: one epoch's order on each host is a disjoint part of the examples.
    from tame_jax.data import sources

    source = sources.make_source(cfg, "train")
    orders = [source._order(i, 2, (0, i, 5)) for i in range(2)]
    assert sorted(np.concatenate(orders).tolist()) == list(range(6))


def test_train_resume_is_exact_and_seeded(folder):
    cfg = _config(root=folder)
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    assert data.steps_per_epoch(cfg, 2) == 3
    full = _take(data.train_iterator(cfg, seed=3, **kw), 8)  # epochs 0, 1 and part of 2
    for b in full:
        assert b["image"].shape == (2, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and set(b) == {"image", "label"}
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    for k in (1, 4):
        tail = _take(data.train_iterator(cfg, seed=3, start_step=k, **kw), 8 - k)
        for a, b in zip(full[k:], tail, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    # Each epoch sees every train example once (labels 3 cats, 3 dogs).
    for e in range(2):
        labels = np.concatenate([b["label"] for b in full[3 * e : 3 * e + 3]])
        assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    other = _take(data.train_iterator(cfg, seed=4, **kw), 3)
    pairs = zip(full[:3], other, strict=True)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in pairs)


def test_train_crop_and_flip_are_windows_of_the_image(tmp_path):
    # resize_size == image_size: no resampling, so every train image must be an exact
    # SIZE x SIZE window of the file (40 x 32 portrait: vertical offsets 0..8), maybe mirrored.
    img = _write(str(tmp_path / "train" / "a" / "x.png"), (40, SIZE), seed=0)
    cfg = _config(root=str(tmp_path), resize_size=SIZE)
    windows = [img[t : t + SIZE] for t in range(40 - SIZE + 1)]
    windows += [w[:, ::-1] for w in windows]
    seen = set()
    for b in _take(data.train_iterator(cfg, global_batch_size=1, seed=0, process_count=1,
                                       process_index=0), 12):  # fmt: skip
        got = np.rint(b["image"][0] * 255).astype(np.uint8)
        matches = [i for i, w in enumerate(windows) if np.array_equal(w, got)]
        assert len(matches) >= 1
        seen.add(matches[0])
    assert len(seen) > 2  # the crop and flip do vary between epochs


def _folder_with_bad_files(root) -> tuple[str, list[str]]:
    """Writes 4 good images and 2 broken ones (garbage, truncated JPEG) per split."""
    bad = []
    for split in ("train", "validation"):
        for i in range(4):
            _write(os.path.join(root, split, "ab"[i % 2], f"{i}.png"), (36, 40), seed=i)
        garbage = os.path.join(root, split, "a", "garbage.jpg")
        with open(garbage, "wb") as f:
            f.write(np.random.default_rng(0).bytes(2000))
        good = _write(os.path.join(root, split, "b", "trunc.jpg"), (60, 80), seed=9)
        del good
        with open(os.path.join(root, split, "b", "trunc.jpg"), "rb") as f:
            raw = f.read()
        with open(os.path.join(root, split, "b", "trunc.jpg"), "wb") as f:
            f.write(raw[: len(raw) // 2])
        bad += [garbage, os.path.join(root, split, "b", "trunc.jpg")]
    return str(root), bad


def test_bad_images_are_skipped_and_counted(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path)
    cfg = _config(root=root, on_bad_image="skip")
    kw = dict(global_batch_size=3, process_index=0, process_count=1)
    assert data.steps_per_epoch(cfg, 3) == 2  # 6 files, the broken ones included
    it = data.train_iterator(cfg, seed=0, **kw)
    full = _take(it, 4)  # two epochs
    assert it.bad_images.count == 4  # each broken file once per epoch
    assert set(it.bad_images.names) == set(bad[:2])
    for b in full:  # holes are filled by repeating good images of the same batch
        assert b["image"].shape == (3, SIZE, SIZE, 3)
        assert all(b["image"][j].std() > 0.01 for j in range(3))
    tail = _take(data.train_iterator(cfg, seed=0, start_step=3, **kw), 1)
    np.testing.assert_array_equal(tail[0]["image"], full[3]["image"])  # resume stays exact
    ev = data.eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1)
    batches = list(ev)
    assert sum(int(b["valid"].sum()) for b in batches) == 4 and len(batches) == 2
    assert ev.bad_images.count == 2 and set(ev.bad_images.names) == set(bad[2:])
    assert data.BAD_IMAGES.count >= 6


def test_bad_images_raise_with_file_name(tmp_path):
    root, bad = _folder_with_bad_files(tmp_path)
    cfg = _config(root=root, on_bad_image="error")
    it = data.eval_iterator(cfg, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(data.BadImageError, match="garbage.jpg.*on_bad_image='skip'"):
        list(it)
    cfg = _config(root=root, on_bad_image="error", eval_split="train")
    os.remove(bad[0])  # only the truncated JPEG is left broken
    it = data.eval_iterator(cfg, global_batch_size=2, process_index=0, process_count=1)
    with pytest.raises(data.BadImageError, match="trunc.jpg"):
        list(it)


def test_batch_must_split_over_processes(folder):
    with pytest.raises(ValueError, match="multiple of 2"):
        data.train_iterator(_config(root=folder), global_batch_size=5, seed=0, process_index=0,
                            process_count=2)  # fmt: skip


def test_imagenet2012_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = _config(source="imagenet2012", data_dir="/nonexistent/tfds", shuffle_buffer=8)
    with tfds.testing.mock_data(num_examples=10):
        info = data.get_dataset_info(cfg)
        assert info.num_classes == 1000 and info.num_train_examples == 10
        kw = dict(process_index=0, process_count=1)
        train = _take(data.train_iterator(cfg, global_batch_size=4, seed=0, **kw), 3)
        for b in train:
            assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
            assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
            assert b["label"].dtype == np.int32 and np.all((0 <= b["label"]) & (b["label"] < 1000))
        batches = list(data.eval_iterator(cfg, global_batch_size=4, **kw))
        assert len(batches) == 3
        np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
        assert sum(int(b["valid"].sum()) for b in batches) == 10


def test_tfds_resume_reads_by_position_not_by_skipping(tiny_config, monkeypatch):
    """ArrayRecord data is read by index: resuming at the last step of an epoch reads one
    batch of records (no reading and discarding), and yields the uninterrupted run's batch."""
    from tensorflow_datasets.core.data_sources import array_record

    cfg = tiny_config()
    kw = dict(global_batch_size=8, seed=5, process_index=0, process_count=1)
    steps = data.steps_per_epoch(cfg, 8)
    assert steps == 8  # synthetic_shapes/tiny: 64 train examples
    full = _take(data.train_iterator(cfg, **kw), steps + 1)
    reads = []
    original = array_record.ArrayRecordDataSource.__getitems__

    def counting(self, keys):
        reads.extend(keys)
        return original(self, keys)

    monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__", counting)
    resumed = data.train_iterator(cfg, start_step=steps - 1, **kw)
    last = next(resumed)
    assert len(reads) == 8  # one batch of records, where skipping would read 64
    np.testing.assert_array_equal(last["image"], full[steps - 1]["image"])
    np.testing.assert_array_equal(last["label"], full[steps - 1]["label"])
    np.testing.assert_array_equal(next(resumed)["image"], full[steps]["image"])  # next epoch
    # Each epoch reads every example once, in a seeded order that changes with the epoch.
    reads.clear()
    _take(data.train_iterator(cfg, **kw), 2 * steps)
    assert sorted(reads[:64]) == sorted(reads[64:]) == list(range(64))
    assert reads[:64] != reads[64:]
