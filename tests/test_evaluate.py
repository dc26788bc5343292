"""Evaluate, compare and explain on a tiny trained run (synthetic_shapes/tiny, 64 px)."""

from __future__ import annotations

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tame_jax import checkpoints, evaluation, explain, metrics, report, train, weights
from tame_jax.image_ops import minmax_normalize
from tame_jax.model import build_model

NUM_EVAL = 10  # not a multiple of the eval batch (8): the last batch is padded


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    config = tiny_config(num_train_steps=2, **{
        "eval.batch_size": 8, "eval.num_examples": NUM_EVAL, "eval.road_fractions": (0.2, 0.7),
        "eval.insertion_step": 1024})
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, workdir)
    return config, workdir


def _eval_batches(config):
    """Returns the padded eval batches (first NUM_EVAL images valid), as evaluate sees them."""
    from tame_jax import data

    batches, seen = [], 0
    for batch in data.eval_iterator(config, global_batch_size=8, process_index=0,
                                    process_count=1):
        if seen >= NUM_EVAL:
            break
        batch["valid"] &= np.arange(seen, seen + 8) < NUM_EVAL
        batches.append(batch)
        seen += 8
    return batches


def _eval_images(config, n):
    batches = _eval_batches(config)
    images = np.concatenate([b["image"][b["valid"]] for b in batches])
    boxes = np.concatenate([b["bbox"][b["valid"]] for b in batches])
    return images[:n], boxes[:n]


@pytest.fixture
def toy_method_and_metric():
    """Registers a toy method (brightness) and a toy metric (mean map); removes them after."""
    evaluation.register_method(evaluation.Method(
        "brightness", lambda model, av, x, classes, key: x.mean(axis=-1)))
    evaluation.register_metric(evaluation.Metric(
        "mean_map", lambda inputs: {"mean_map": inputs.maps.mean(axis=(1, 2))},
        columns=lambda config: ["mean_map"], decimals=4))
    yield
    del evaluation.METHODS["brightness"], evaluation.METRICS["mean_map"]


def test_registered_method_and_metric_reach_the_table_and_match_direct_metrics(
        run, tmp_path, toy_method_and_metric):
    config, workdir = run
    (row,) = evaluation.run(config, workdir, method="brightness", out_dir=str(tmp_path))
    assert row["num_images"] == NUM_EVAL  # the padding is counted out
    saved = json.load(open(tmp_path / "brightness.json"))
    assert saved["columns"][-2:] == ["mean_map", "num_images"]
    assert "| mean_map |" in open(tmp_path / "brightness.md").read().replace(" num_images |", "")
    assert saved["formats"]["mean_map"] == {"percent": False, "decimals": 4, "better": "higher"}
    assert saved["formats"]["deletion"]["better"] == "lower"
    assert saved["formats"]["road_morf_20"]["better"] == "lower"
    # Per-image values: one line per image, on the table's scale, and their means are the row.
    assert saved["per_image"] == "brightness.per_image.csv"
    per = report.read_per_image(str(tmp_path / "brightness.per_image.csv"))[("brightness", "-")]
    np.testing.assert_array_equal(per["image"], np.arange(NUM_EVAL))
    batches = _eval_batches(config)
    labels = np.concatenate([b["label"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(per["label"], labels)
    model = build_model(config)
    images = np.concatenate([b["image"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(per["class"], np.argmax(model.classify(images), -1))
    for c in saved["columns"][2:-1]:
        np.testing.assert_allclose(per[c].mean(), row[c], rtol=1e-12, err_msg=c)
    assert set(np.unique(per["pointing"])) <= {0.0, 100.0}  # a hit is 100 on the % scale
    for c in ("ad_100", "ic_15", "road_morf_20", "road_lerf_70", "insertion", "deletion",
              "agreement", "pointing", "energy_in_box"):
        assert c in saved["columns"]

    # The same numbers computed directly, batch by batch on one device, without evaluation.
    # The toy maps are exact (no float noise between the sharded and the direct path), so
    # every pixel order, and with it every metric, must agree to the classifier's rounding.
    _, k_metrics = jax.random.split(jax.random.key(config.seed))  # one key for every batch
    per_image: dict[str, list] = {}
    for batch in _eval_batches(config):
        x = jnp.asarray(batch["image"])
        maps = x.mean(axis=-1)
        classes = jnp.argmax(model.classify(x), -1)
        out = metrics.ad_ic(model.classify, x, maps, classes, config.eval.ad_ic_fractions)
        # ROAD and insertion/deletion act on the normalised input, through the backbone.
        xn = model.normalize(x)
        backbone = lambda z: model.apply_backbone(z)[0]  # noqa: E731
        kept = metrics.road_orders(backbone, xn, maps, classes, k_metrics,  # noise per image
                                   config.eval.road_fractions, selection="percentile",
                                   index=jnp.asarray(batch["index"], jnp.int32))
        out["road_morf_20"], out["road_lerf_70"] = kept[0, :, 0], kept[1, :, 1]
        out.update(metrics.insertion_deletion(backbone, xn, maps, classes, step=1024,
                                              substrate="rise"))
        # The toy maps do not depend on the class: the label's map is the same map.
        out["pointing"] = metrics.pointing_game(maps, jnp.asarray(batch["bbox"]))
        out["mean_map"] = maps.mean(axis=(1, 2))
        for k, v in out.items():
            per_image.setdefault(k, []).append(np.asarray(v, np.float64)[batch["valid"]])
    direct = {k: np.concatenate(v).mean() for k, v in per_image.items()}
    for k in ("ad_100", "ad_50", "ad_15", "ic_100", "ic_50", "ic_15", "road_morf_20",
              "road_lerf_70", "pointing"):
        np.testing.assert_allclose(row[k], 100 * direct[k], rtol=1e-4, atol=1e-4, err_msg=k)
    for k in ("insertion", "deletion", "mean_map"):
        np.testing.assert_allclose(row[k], direct[k], rtol=1e-4, err_msg=k)


def test_evaluate_gradcam_counts_each_image_once(run, tmp_path):
    config, workdir = run
    (row,) = evaluation.run(config, workdir, method="gradcam", out_dir=str(tmp_path))
    assert row["num_images"] == NUM_EVAL
    for ext in ("csv", "json", "md"):
        assert os.path.getsize(tmp_path / f"gradcam.{ext}") > 100
    # AD/IC at 100% keep every pixel (no ranking), so they compare across batch layouts.
    model = build_model(config)
    images, _ = _eval_images(config, NUM_EVAL)
    from tame_jax import cams

    x = jnp.asarray(images)
    classes = jnp.argmax(model.classify(x), -1)
    maps = minmax_normalize(cams.cam("gradcam", model, x, classes, layer="layer4"))
    terms = metrics.ad_ic(model.classify, x, maps, classes, (1.0,))
    np.testing.assert_allclose(row["ad_100"], 100 * float(terms["ad_100"].mean()), rtol=1e-3)
    np.testing.assert_allclose(row["ic_100"], 100 * float(terms["ic_100"].mean()), atol=1e-6)
    # ... and the same numbers are in the workdir's TensorBoard events, beside training's
    from tests.test_train import _event_values

    values = _event_values(workdir)
    np.testing.assert_allclose(values["eval/gradcam/ad_100"][-1], row["ad_100"], rtol=1e-6)
    assert "loss" in values  # the training curves are in the same log directory


def test_evaluate_tame_all_checkpoints_and_compare(run, tmp_path):
    config, workdir = run
    rows = evaluation.run(config, workdir, method="tame", steps="all", out_dir=str(tmp_path))
    assert [r["step"] for r in rows] == [2]
    r = rows[0]
    assert 0 <= r["ad_100"] <= 100 and 0 <= r["road_morf_70"] <= 100
    assert 0 <= r["insertion"] <= 1 and 0 <= r["deletion"] <= 1
    with pytest.raises(ValueError, match=r"no checkpoint for \[7\]; available steps are \[2\]"):
        evaluation.run(config, workdir, method="tame", steps="7", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="choose one of"):
        evaluation.run(config, workdir, method="gradcan", out_dir=str(tmp_path))

    # A fake baseline from TAME's own per-image values: AD(100%) 5 points worse on every image,
    # the same IC(100%), and a deletion AUC 0.01 lower (better) on every image.
    saved = json.load(open(tmp_path / "tame.json"))
    columns = saved["columns"][2:-1]
    per = report.read_per_image(str(tmp_path / "tame.per_image.csv"))[("tame", "2")]
    fake_per = dict(per, ad_100=per["ad_100"] + 5, deletion=per["deletion"] - 0.01)
    fake = dict(r, method="gradcam", step="-", ad_100=r["ad_100"] + 5,
                deletion=r["deletion"] - 0.01)
    other = tmp_path / "other"
    report.write_tables([fake], columns, str(other), "gradcam", formats=saved["formats"],
                        per_image=[("-", fake_per)])
    table = report.compare([str(tmp_path / "tame.json"), str(other)], str(tmp_path / "cmp"))
    lines = table.splitlines()
    tame_line = next(x for x in lines if x.startswith("| tame | 2 | 10 |"))
    # Every mean comes with its interval, which holds the mean.
    lo, hi = (float(v) for v in tame_line.split("|")[4].split("[")[1].rstrip("] ").split(","))
    assert lo <= r["ad_100"] <= hi and hi > lo
    paired = {(x["method"], x["metric"]): x for x in
              csv.DictReader(open(tmp_path / "cmp" / "comparison_paired.csv"))}
    ad, ic, dele = (paired[("gradcam", c)] for c in ("ad_100", "ic_100", "deletion"))
    assert float(ad["diff"]) == pytest.approx(-5) and float(ad["hi"]) == pytest.approx(-5)
    assert ad["verdict"] == "better" and int(ad["n"]) == NUM_EVAL  # lower AD is better
    assert float(ic["diff"]) == 0 and ic["verdict"] == "no clear difference"
    assert dele["verdict"] == "worse" and float(dele["diff"]) == pytest.approx(0.01)
    assert "| gradcam | 10 |" in table and "**better**" in table and "*worse*" in table
    assert os.path.getsize(tmp_path / "cmp" / "comparison.png") > 5000
    # Seeded: the same results give the same tables, to the last digit.
    again = report.compare([str(tmp_path / "tame.json"), str(other)], str(tmp_path / "cmp2"))
    assert again == table
    assert (open(tmp_path / "cmp" / "comparison.csv").read()
            == open(tmp_path / "cmp2" / "comparison.csv").read())
    assert report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2


def test_explainer_api_and_reference_release_agree(run, tmp_path):
    config, workdir = run
    ex = explain.Explainer.from_checkpoint(workdir)
    images, _ = _eval_images(config, 3)
    e = ex.explain(images)
    maps, classes, probs = e.maps[:, 0], e.classes[:, 0], e.probabilities
    assert maps.shape == (3, 64, 64)
    # min-max normalised at S x S, then bilinearly upsampled: within [0, 1], extremes blurred.
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert np.all(maps.max(axis=(1, 2)) > 0.8) and np.all(maps.min(axis=(1, 2)) < 0.2)
    np.testing.assert_array_equal(classes, probs.argmax(-1))
    np.testing.assert_allclose(ex(images), maps)
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
                         "--top_k", "2", "--out", str(out), "--save", "image"])
    assert code == 1
    err = capsys.readouterr().err
    assert "notes.jpg: not a readable image" in err and "1 of 3 files" in err
    for i in range(2):
        assert os.path.getsize(out / f"img{i}.png.tame.png") > 5000
        with np.load(out / f"img{i}.png.tame.npz") as z:
            assert z["maps"].shape == (2, 64, 64)


def test_bootstrap_intervals_are_seeded_and_have_the_normal_width():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(400, 2)) * [1.0, 3.0] + [0.0, 10.0]
    lo, hi = report.confidence_intervals(values, seed=1)
    means, sd = values.mean(0), values.std(0, ddof=1)
    # Large n: the percentile interval is close to mean +- 1.96 sd / sqrt(n).
    np.testing.assert_allclose((hi - lo) / 2, 1.96 * sd / 20, rtol=0.1)
    assert np.all(np.abs((hi + lo) / 2 - means) < 0.2 * sd / 20)
    lo2, hi2 = report.confidence_intervals(values, seed=1)
    np.testing.assert_array_equal(lo, lo2)
    np.testing.assert_array_equal(hi, hi2)
    assert not np.array_equal(lo, report.confidence_intervals(values, seed=2)[0])
    # A paired difference: a clear shift has a tiny p-value, none a large one.
    ref = {"image": np.arange(400), "a": values[:, 0] + 0.3, "b": values[:, 0]}
    other = {"image": np.arange(400)[::-1], "a": values[::-1, 0], "b": values[::-1, 0]
             + rng.normal(size=400) * 0.01}
    diffs = {d["metric"]: d for d in report.paired_comparison(ref, other, ["a", "b"], seed=3)}
    assert diffs["a"]["diff"] == pytest.approx(0.3) and diffs["a"]["p"] < 1e-3
    assert diffs["b"]["lo"] < 0 < diffs["b"]["hi"] and diffs["b"]["p"] > 0.05
    assert report.verdict(diffs["a"], "higher") == "better"
    assert report.verdict(diffs["a"], "lower") == "worse"
    assert report.verdict(diffs["b"], "higher") == "no clear difference"


@pytest.mark.parametrize("slow", [False, True])  # slow: only the misclassified images again
def test_pointing_game_uses_the_ground_truth_class_map_and_the_predicted_apart(run, tmp_path,
                                                                               slow):
    """A toy method whose map peaks at a place set by the class: the pointing column follows
    the labels' maps, pointing_pred the explained (predicted) classes' maps."""
    config, workdir = run
    config = config.copy_and_resolve_references()
    config.eval.metrics = ("pointing",)
    config.eval.pointing_classes = ("label", "predicted")

    def peak_maps(classes, size=64):  # (B, H, W): one bright pixel at (6c, 6c)
        c = jnp.asarray(classes)[:, None, None]
        yy, xx = jnp.arange(size)[None, :, None], jnp.arange(size)[None, None, :]
        return ((yy == 6 * c) & (xx == 6 * c)).astype(jnp.float32)

    evaluation.register_method(evaluation.Method(
        "classpeak", lambda model, av, x, classes, key: peak_maps(classes), slow=slow))
    try:
        (row,) = evaluation.run(config, workdir, method="classpeak", out_dir=str(tmp_path))
    finally:
        del evaluation.METHODS["classpeak"]
    per = report.read_per_image(str(tmp_path / "classpeak.per_image.csv"))[("classpeak", "-")]
    batches = _eval_batches(config)
    boxes = np.concatenate([b["bbox"][b["valid"]] for b in batches])
    labels = np.concatenate([b["label"][b["valid"]] for b in batches])
    assert (labels != per["class"]).any()  # the random backbone is often wrong: two passes
    truth = metrics.pointing_game(peak_maps(labels), jnp.asarray(boxes))
    pred = metrics.pointing_game(peak_maps(per["class"]), jnp.asarray(boxes))
    np.testing.assert_array_equal(per["pointing"], 100.0 * np.asarray(truth))
    np.testing.assert_array_equal(per["pointing_pred"], 100.0 * np.asarray(pred))
    assert not np.array_equal(per["pointing"], per["pointing_pred"])
    assert set(row) >= {"pointing", "pointing_pred"}
