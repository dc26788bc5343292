"""A shortened demo end to end: shipped backbone, tiny data, few steps, every output written."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from ml_collections import config_flags

from tame_jax import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_demo_config():
    """Returns configs/demo.py's config, as `--config=configs/demo.py` would load it."""
    return config_flags.config_flags._LoadConfigModule(  # noqa: SLF001
        "demo_config", str(ROOT / "configs" / "demo.py")).get_config()


def test_shipped_demo_backbone_is_accurate_on_the_test_split():
    config = load_demo_config()
    assert os.path.getsize(config.model.backbone_weights) < 5 * 2**20
    record = json.loads(pathlib.Path(config.model.backbone_weights).with_suffix(".json")
                        .read_text())
    assert record["test_accuracy"] >= 0.95 and record["test_images"] == 1000
    assert record["command"].startswith("python -m tame_jax.tools.train_backbone")


def test_short_demo_writes_every_output(tmp_path):
    config = load_demo_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.synthetic_config = "tiny"
    config.num_train_steps = 4
    config.batch_size = 8
    config.log_every = 2
    config.checkpoint_every = 2
    config.eval.batch_size = 8
    config.eval.num_examples = 8
    config.eval.num_examples_slow = 4  # RISE: the first 4 only
    config.eval.road_fractions = (0.5,)
    config.eval.road_lerf_fractions = ()  # LeRF at the same 50% (the demo config sets 90%)
    config.eval.insertion_step = 1024
    config.eval.rise_masks = 16
    workdir = str(tmp_path / "demo")
    methods = ("tame", "gradcam", "rise")
    times = demo.run(config, workdir, methods)
    assert set(times) == {"data", "train", "eval tame", "eval gradcam", "eval rise", "figures"}

    eval_dir = pathlib.Path(workdir) / "eval"
    text = (eval_dir / "comparison.md").read_text()
    means = [line for line in text.splitlines() if line.startswith("| ")][:4]
    assert [line.split("|")[1].strip() for line in means[1:]] == list(methods)
    assert [line.split("|")[3].strip() for line in means[1:]] == ["8", "8", "4"]
    assert all("[" in cell for cell in means[1].split("|")[4:-1])  # every mean has its interval
    assert "| gradcam | 8 |" in text and "| rise | 4 |" in text  # paired on common images
    for m in methods:
        row = json.loads((eval_dir / f"{m}.json").read_text())["rows"][0]
        assert row["num_images"] == (4 if m == "rise" else 8)
        per_image = (eval_dir / f"{m}.per_image.csv").read_text().splitlines()
        assert len(per_image) == 1 + row["num_images"]
        for k in ("ad_100", "ic_100", "ad_15", "road_morf_50", "road_lerf_50", "agreement",
                  "pointing", "energy_in_box"):
            assert 0 <= row[k] <= 100, (m, k, row[k])
        for k in ("insertion", "deletion"):
            assert 0 <= row[k] <= 1
    from PIL import Image

    with Image.open(eval_dir / "comparison.png") as im:
        assert im.size[0] > 800 and np.asarray(im).std() > 10
    with Image.open(pathlib.Path(workdir) / "demo_grid.png") as im:
        # a row per grid image, a column for the image and one per method
        assert im.size == (round(2.2 * 4 * 90), round(2.3 * demo.GRID_IMAGES * 90))
        assert np.asarray(im).std() > 10


if __name__ == "__main__":
    pytest.main([__file__])
