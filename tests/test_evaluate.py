"""Evaluate, compare and explain on a tiny trained run (synthetic_shapes/tiny, 64 px)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tame_jax import checkpoints, compare, evaluate, explain, metrics, train, weights
from tame_jax.image_ops import minmax_normalize
from tame_jax.model import build_model
from tame_jax.parallel import backbone_forward
from tests.test_train import tiny_config

NUM_EVAL = 10  # not a multiple of the eval batch (8): the last batch is padded


def eval_config(data_dir: str):
    c = tiny_config(data_dir, num_train_steps=2)
    c.eval.batch_size = 8
    c.eval.num_examples = NUM_EVAL
    c.eval.road_fractions = (0.2, 0.7)
    c.eval.insertion_steps = 4
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tame_jax import data

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_synthetic_shapes(data_dir, config_name="tiny")
    config = eval_config(data_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


def _eval_images(config, n):
    from tame_jax import data

    images, boxes = [], []
    for batch in data.eval_iterator(config, global_batch_size=8, process_index=0,
                                    process_count=1):
        images.append(batch["image"][batch["valid"]])
        boxes.append(batch["bbox"][batch["valid"]])
    return np.concatenate(images)[:n], np.concatenate(boxes)[:n]


def test_evaluate_counts_each_image_once_and_matches_direct_metrics(run, tmp_path):
    config, workdir = run
    rows = evaluate.run(config, workdir, method="gradcam", out_dir=str(tmp_path))
    (row,) = rows
    assert row["num_images"] == NUM_EVAL
    for ext in ("csv", "json", "md"):
        assert os.path.getsize(tmp_path / f"gradcam.{ext}") > 100
    cols = json.load(open(tmp_path / "gradcam.json"))["columns"]
    for c in ("ad_100", "ic_15", "road_morf_20", "road_lerf_70", "insertion", "deletion",
              "agreement", "pointing", "energy_in_box"):
        assert c in cols

    # The same numbers computed directly on the first NUM_EVAL images, without evaluate.py.
    model = build_model(config)
    images, boxes = _eval_images(config, NUM_EVAL)
    from tame_jax import cams

    x = jnp.asarray(images)
    logits, _ = model.features(x)
    classes = jnp.argmax(logits, -1)
    maps = minmax_normalize(cams.cam("gradcam", model.backbone, model.backbone_vars, x, classes,
                                     layer="layer4"))

    def classify(im):
        return backbone_forward(model.backbone, model.backbone_vars, im)[0]

    terms = metrics.ad_ic(classify, x, maps, classes)
    ad, ic = metrics.average_drop_increase(terms["ad_100"], terms["ic_100"])
    np.testing.assert_allclose(row["ad_100"], ad, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(row["ic_100"], ic, atol=1e-6)
    # Thresholds rank pixels of nearly flat upsampled maps: float noise between the sharded,
    # jitted evaluation and this direct path may swap a few near-tied pixels at the cut.
    for f in ("50", "15"):
        ad, _ = metrics.average_drop_increase(terms[f"ad_{f}"], terms[f"ic_{f}"])
        np.testing.assert_allclose(row[f"ad_{f}"], ad, atol=0.5)
    hits = metrics.pointing_game(maps, jnp.asarray(boxes))
    np.testing.assert_allclose(row["pointing"], 100 * float(hits.mean()), atol=1e-6)
    auc = metrics.insertion_deletion(classify, x, maps, classes, num_steps=4)
    np.testing.assert_allclose(row["deletion"], float(auc["deletion"].mean()), rtol=1e-4)


def test_evaluate_tame_all_checkpoints_and_compare(run, tmp_path):
    config, workdir = run
    rows = evaluate.run(config, workdir, method="tame", steps="all", out_dir=str(tmp_path))
    assert [r["step"] for r in rows] == [2]
    r = rows[0]
    assert 0 <= r["ad_100"] <= 100 and 0 <= r["road_morf_70"] <= 100
    assert 0 <= r["insertion"] <= 1 and 0 <= r["deletion"] <= 1
    with pytest.raises(ValueError, match=r"no checkpoint for \[7\]; available steps are \[2\]"):
        evaluate.run(config, workdir, method="tame", steps="7", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="choose one of"):
        evaluate.run(config, workdir, method="gradcan", out_dir=str(tmp_path))

    fake = dict(r, method="gradcam", step="-", ad_100=r["ad_100"] + 1)
    other = tmp_path / "other"
    evaluate.write_tables([fake], list(json.load(open(tmp_path / "tame.json"))["columns"][2:-1]),
                          str(other), "gradcam")
    table = compare.compare([str(tmp_path / "tame.json"), str(other)], str(tmp_path / "cmp"))
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| tame | 2 |")
    assert lines[3].startswith("| gradcam | - |")
    assert os.path.getsize(tmp_path / "cmp" / "comparison.png") > 5000
    assert compare.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2


def test_explainer_api_and_reference_release_agree(run, tmp_path):
    config, workdir = run
    ex = explain.Explainer.from_checkpoint(workdir)
    images, _ = _eval_images(config, 3)
    maps, classes, probs = ex.explain(images)
    assert maps.shape == (3, 64, 64)
    # min-max normalised at S x S, then bilinearly upsampled: within [0, 1], extremes blurred.
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert np.all(maps.max(axis=(1, 2)) > 0.8) and np.all(maps.min(axis=(1, 2)) < 0.2)
    np.testing.assert_array_equal(classes, probs.argmax(-1))
    other = (classes + 1) % 10
    assert not np.allclose(ex(images, other), maps)
    with pytest.raises(ValueError, match=r"classes must be in \[0, 10\)"):
        ex(images, 10)

    # The same attention exported in the reference release's layout loads back identically.
    model = build_model(config)
    attention_vars, _ = checkpoints.restore_attention(config, workdir, model)
    path = tmp_path / "tame.npz"
    np.savez(path, **weights.tame_state_dict_from_variables(jax.device_get(attention_vars)))
    bw = tmp_path / "backbone.npz"
    np.savez(bw, **weights.flax_to_torchvision(jax.device_get(model.backbone_vars)))
    ref = explain.Explainer.from_reference_release(
        str(path), backbone="resnet18", backbone_weights=str(bw), num_classes=10, image_size=64,
        backbone_kwargs={"width": 8})
    np.testing.assert_allclose(ref(images), maps, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        explain.Explainer.from_reference_release(
            str(path), backbone="resnet18", backbone_weights=str(bw), num_classes=10,
            image_size=64, backbone_kwargs={"width": 16})


def test_explain_cli_writes_overlays_and_reports_bad_files(run, tmp_path, capsys):
    config, workdir = run
    images, _ = _eval_images(config, 2)
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((im * 255).astype(np.uint8)).resize((80, 96)).save(p)
        paths.append(str(p))
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    code = explain.main(["--workdir", workdir, "--images", paths[0], str(bad), paths[1],
                         "--top_k", "2", "--out", str(out), "--save_npy"])
    assert code == 1
    err = capsys.readouterr().err
    assert "notes.jpg: not a readable image" in err and "1 of 3 files" in err
    for i in range(2):
        assert os.path.getsize(out / f"img{i}_tame.png") > 5000
        assert np.load(out / f"img{i}_maps.npy").shape == (2, 64, 64)
