"""Tests of the synthetic_shapes demo data set: rendering and the tfds builder."""

from __future__ import annotations

import itertools
import os

import ml_collections
import numpy as np
import pytest

from tame_jax import data, shapes
from tame_jax.data import synthetic_shapes as ss


def test_render_is_deterministic_and_seeded():
    a = ss.render_example(np.random.default_rng(7), 3)
    b = ss.render_example(np.random.default_rng(7), 3)
    c = ss.render_example(np.random.default_rng(8), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (128, 128, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (128, 128) and a[1].dtype == bool


@pytest.mark.parametrize("label", range(ss.NUM_CLASSES))
def test_bbox_is_tight_box_of_mask(label):
    for seed in range(5):
        _, mask, bbox = ss.render_example(np.random.default_rng(seed), label)
        y0, x0, y1, x1 = bbox.astype(int)
        assert mask.sum() > 150  # objects are at least 24 px across
        assert mask[y0:y1, x0:x1].sum() == mask.sum()  # the box contains the whole mask
        # ... and is tight: each edge row/column of the box holds object pixels
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
        assert 20 <= max(y1 - y0, x1 - x0) <= 64


def test_classes_differ_by_shape_not_placement():
    # Same random stream -> same placement, size and rotation; only the shape changes.
    masks = [ss.render_example(np.random.default_rng(11), k)[1] for k in range(ss.NUM_CLASSES)]
    for i in range(ss.NUM_CLASSES):
        for j in range(i + 1, ss.NUM_CLASSES):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (ss.CLASS_NAMES[i], ss.CLASS_NAMES[j], iou)


def test_object_is_visible_against_background():
    for seed in range(10):
        img, mask, _ = ss.render_example(np.random.default_rng(seed), seed % 10)
        ring = np.zeros_like(mask)  # the pixels just outside the object
        ys, xs = np.nonzero(mask)
        for dy, dx in [(-2, 0), (2, 0), (0, -2), (0, 2)]:
            ring[np.clip(ys + dy, 0, 127), np.clip(xs + dx, 0, 127)] = True
        ring &= ~mask
        inside = img[mask].astype(float).mean(0)
        outside = np.median(img[ring].astype(float), axis=0)
        assert np.abs(inside - outside).max() > 30


def test_tiny_builder_and_pipeline(tmp_path):
    data_dir = str(tmp_path)
    data.prepare_synthetic_shapes(data_dir, config_name="tiny")
    stamp = os.path.getmtime(os.path.join(data_dir, "synthetic_shapes", "tiny", "1.0.0"))
    data.prepare_synthetic_shapes(data_dir, config_name="tiny")  # idempotent: no rebuild
    assert os.path.getmtime(os.path.join(data_dir, "synthetic_shapes", "tiny", "1.0.0")) == stamp
    cfg = ml_collections.ConfigDict(
        {
            "data": dict(
                source="synthetic_shapes",
                data_dir=data_dir,
                synthetic_config="tiny",
                train_split="train",
                eval_split="validation",  # an alias of "test" for synthetic_shapes
                image_size=128,
                resize_size=128,
                on_bad_image="error",
                shuffle_buffer=64,
            )
        }
    )
    assert data.get_dataset_info(cfg) == data.DatasetInfo(10, 64, 40, 128)
    kw = dict(process_index=0, process_count=1)
    batches = list(data.eval_iterator(cfg, global_batch_size=16, **kw))
    assert len(batches) == 3 and sum(int(b["valid"].sum()) for b in batches) == 40
    b = batches[0]
    assert set(b) == {"image", "label", "valid", "bbox", "object_mask", "index"}
    assert b["object_mask"].shape == (16, 128, 128) and b["object_mask"].dtype == bool
    # Test example i in file order is render_example((seed 0, split 1, i), i % 10).
    labels = np.concatenate([x["label"][x["valid"]] for x in batches])
    # tfds may store examples in any order: find example 0 by its pixels.
    img0, mask0, bbox0 = ss.render_example(np.random.default_rng((0, 1, 0)), 0)
    rows = [
        (k, j) for k, x in enumerate(batches) for j in np.flatnonzero(x["valid"])
        if np.array_equal(np.rint(x["image"][j] * 255).astype(np.uint8), img0)
    ]  # fmt: skip
    assert len(rows) == 1
    k, j = rows[0]
    assert batches[k]["label"][j] == 0
    np.testing.assert_array_equal(batches[k]["object_mask"][j], mask0)
    np.testing.assert_allclose(batches[k]["bbox"][j], bbox0, atol=1e-4)
    assert sorted(labels.tolist()) == sorted([i % 10 for i in range(40)])
    # Train through tfds (the imagenet2012 code path): shapes, and exact resume at step 6
    # (epoch 0) and 9 (epoch 1): same images, same crops and flips as from step 0.
    train = data.train_iterator(cfg, global_batch_size=8, seed=0, **kw)
    assert len(train) == 8
    full = [next(train) for _ in range(11)]
    assert set(full[0]) == {"image", "label"} and full[0]["image"].shape == (8, 128, 128, 3)
    epoch0 = np.concatenate([b["label"] for b in full[:8]])
    assert sorted(epoch0.tolist()) == sorted([i % 10 for i in range(64)])  # each example once
    for k in (6, 9):
        tail = data.train_iterator(cfg, global_batch_size=8, seed=0, start_step=k, **kw)
        for a in full[k:]:
            b = next(tail)
            np.testing.assert_array_equal(a["image"], b["image"])
    # Host shards of the tfds split: disjoint, covering, equal batch counts.
    hosts = [list(data.eval_iterator(cfg, global_batch_size=16, process_index=i, process_count=2))
             for i in range(2)]  # fmt: skip
    assert len(hosts[0]) == len(hosts[1]) == 3  # 20 examples each, local batch 8
    keys = [{x["image"][j].tobytes() for x in h for j in np.flatnonzero(x["valid"])} for h in hosts]
    assert len(keys[0]) == len(keys[1]) == 20 and not keys[0] & keys[1]
    # Each example's index in the split is the one it has on one host (hosts: consecutive
    # blocks of the split).
    whole = {int(i): x["image"][j].tobytes() for x in batches
             for j, i in enumerate(x["index"]) if x["valid"][j]}
    assert sorted(whole) == list(range(40))
    # tame_jax.shapes draws the stored test split again, without tfds (the trainer scores
    # --fresh_images runs on it).
    # (tfds stores examples in its own order: compare as sets of (image, label).)
    drawn = next(shapes.test_batches(40, num=40))
    assert drawn["label"].tolist() == [i % 10 for i in range(40)]
    as_pairs = lambda xs, ys: {(x.tobytes(), int(y)) for x, y in zip(xs, ys, strict=True)}
    stored = set().union(*(as_pairs(x["image"][x["valid"]], x["label"][x["valid"]])
                           for x in batches))
    assert as_pairs(drawn["image"], drawn["label"]) == stored
    for h, host in enumerate(hosts):
        seen = [int(i) for x in host for i in x["index"][x["valid"]]]
        assert seen == list(range(20 * h, 20 * h + 20))
        for x in host:
            for j in np.flatnonzero(x["valid"]):
                assert x["image"][j].tobytes() == whole[int(x["index"][j])]


def test_fresh_training_stream_is_seeded_and_never_a_stored_image():
    first = list(itertools.islice(shapes.rendered_batches(5, seed=0, workers=0), 2))
    spawned = list(itertools.islice(shapes.rendered_batches(5, seed=0, workers=2), 2))
    for a, b in zip(first, spawned, strict=True):  # worker processes draw the same batches
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert first[1]["label"].tolist() == [5, 6, 7, 8, 9]  # example k * 5 + j, label = index % 10
    assert first[0]["image"].dtype == np.float32 and first[0]["image"].max() <= 1.0
    other_seed = next(shapes.rendered_batches(5, seed=1, workers=0))
    assert not np.array_equal(other_seed["image"], first[0]["image"])
    stored = {ss.draw(0, split, i)[0].tobytes() for split in (shapes.TRAIN_SPLIT, shapes.TEST_SPLIT)
              for i in range(10)}  # fmt: skip
    fresh = {np.rint(x * 255).astype(np.uint8).tobytes() for b in first for x in b["image"]}
    assert len(fresh) == 10 and not fresh & stored
