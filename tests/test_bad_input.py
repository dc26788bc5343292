"""Bad input gets a clear error (or a counted skip) that names the problem and loses nothing.

The broken-JPEG and NaN cases run `python -m tame_jax.train` in subprocesses (1 CPU device,
one compiled step shared through the compilation cache); the others fail before the first
step and run in this process (8 fake devices).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tame_jax import checkpoints, optim, train, weights
from tame_jax.model import build_model
from tame_jax.train_step import TrainState

STEPS = 16  # as in test_resume: the same compiled step, from the shared compilation cache
TIMEOUT_S = 240
BROKEN = os.path.join("train", "class0", "broken.jpg")


def _write_broken_jpeg(path: str) -> None:
    """Writes the first half of a valid JPEG (a truncated file that does not decode)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


def _epoch_orders(config, seed: int, epochs: int) -> list[list[str]]:
    """Returns, per epoch, the files in the order the (single-host) pipeline reads them."""
    from tame_jax.data import sources

    source = sources.make_source(config, "train")
    return [[os.fsdecode(source.paths[i]) for i in source._order(0, 1, (seed, 0, e))]
            for e in range(epochs)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trainer, image_folder):
    """Runs the three subprocess runs; returns {name: (returncode, log)} and facts."""
    tmp = tmp_path_factory.mktemp("bad_input")
    env = trainer.env(devices=1, cache_dir=str(tmp_path_factory.getbasetemp() / "jax_cache"))
    # 16 good images and a truncated JPEG: 17 files, batch 8, so 2 steps per epoch and one
    # file left out per epoch. Pick the seed that leaves the broken file out of epoch 0 and
    # reads it in epoch 1: the checkpoint of step 2 exists before it is met.
    root = str(tmp / "data")
    image_folder(root, per_class=8)
    broken = os.path.join(root, BROKEN)
    _write_broken_jpeg(broken)
    config = trainer.config(root)
    seed = next(s for s in range(1000)
                if (o := _epoch_orders(config, s, 2))[0][-1] == broken and broken in o[1][:-1])
    orders = _epoch_orders(trainer.config(root), seed, STEPS // 2)
    expected_skips = sum(broken in order[:-1] for order in orders)

    # A backbone whose classifier weights are NaN (same shapes, so the same compiled step).
    sd = weights.flax_to_torchvision(build_model(trainer.config(root)).backbone_vars)
    sd["fc.weight"] = np.full_like(sd["fc.weight"], np.nan)
    nan_weights = str(tmp / "nan_fc.npz")
    np.savez(nan_weights, **sd)

    common = (f"--config.num_train_steps={STEPS}", f"--config.seed={seed}")

    def run(name: str, *flags: str) -> tuple[int, str]:
        log = str(tmp / f"{name}.txt")
        p = trainer.start(trainer.command(str(tmp / name), root, *common, *flags), env, log)
        text = trainer.finish(p, log, TIMEOUT_S)
        return p.returncode, text

    # All three run the same program: the first compiles it, the others find it in the cache.
    out = {"skip": run("skip", "--config.data.on_bad_image=skip"),
           "error": run("error", "--config.data.on_bad_image=error")}
    # NaN: resume a copy of the error run's workdir (checkpoint of step 2) with the NaN backbone.
    shutil.copytree(str(tmp / "error"), str(tmp / "nan"))
    out["nan"] = run("nan", "--config.data.on_bad_image=skip",
                     f"--config.model.backbone_weights={nan_weights}")
    error_block = orders[1].index(broken) // 8  # the batch of epoch 1 that holds it
    return dict(out, tmp=str(tmp), root=root, broken=broken, expected_skips=expected_skips,
                last_logged_step=2 + error_block)


def test_broken_jpeg_is_skipped_and_counted(runs):
    code, text = runs["skip"]
    assert code == 0, text[-3000:]
    skipped = re.findall(r"Skipping unreadable image (\S+) \((\d+) skipped so far\)", text)
    assert runs["expected_skips"] >= 3
    assert [n for _, n in skipped] == [str(i + 1) for i in range(runs["expected_skips"])]
    assert {name for name, _ in skipped} == {runs["broken"]}
    assert f"step {STEPS}/{STEPS}" in text


def test_broken_jpeg_with_on_bad_image_error_names_the_file_and_keeps_the_checkpoint(
        runs, trainer, checkpoint_steps):
    code, text = runs["error"]
    assert code not in (0, None), text[-3000:]
    assert re.search(rf"BadImageError: Cannot decode image {re.escape(runs['broken'])}: .*"
                     r"set config.data.on_bad_image='skip'", text), text[-3000:]
    last = runs["last_logged_step"]  # the steps before the batch holding the broken file
    assert f"step {last}/{STEPS}" in text and f"step {last + 1}/{STEPS}" not in text
    workdir = os.path.join(runs["tmp"], "error")
    assert checkpoint_steps(workdir) == [2]  # written before the broken file was met, and kept
    config = trainer.config(runs["root"])
    restored, step = checkpoints.restore_attention(config, workdir, build_model(config))
    assert step == 2 and _all_finite(restored)


def test_nan_stops_names_the_step_and_keeps_the_last_good_checkpoint(runs, trainer,
                                                                    checkpoint_steps):
    code, text = runs["nan"]
    assert code not in (0, None), text[-3000:]
    assert "resuming from the checkpoint of step 2" in text
    workdir = os.path.join(runs["tmp"], "nan")
    expected = (f"FloatingPointError: loss became nan at step 3; stopping without saving it. "
                f"The last good checkpoint is step 2 in {workdir}/checkpoints. "
                "Lower config.learning_rate")
    assert expected in text, text[-3000:]
    assert checkpoint_steps(workdir) == [2]  # kept, and nothing saved after it
    config = trainer.config(runs["root"])
    restored, _ = checkpoints.restore_attention(config, workdir, build_model(config))
    assert _all_finite(restored)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def test_loss_check_names_the_step_and_the_last_good_checkpoint(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path), every=1)
    state = {"params": {"w": np.ones(3, np.float32)}}
    ckpt.save(3, state, force=True)
    train.check_finite({"loss": np.float32(1.5)}, 4, ckpt)  # finite: no error
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 5; stopping without "
                       r"saving it\. The last good checkpoint is step 3 in "):
        train.check_finite({"loss": np.float32("nan")}, 5, ckpt)
    bad = TrainState(step=np.int32(6), params={"w": np.array([1.0, np.inf], np.float32)},
                     batch_stats={}, opt_state=())
    with pytest.raises(FloatingPointError, match=r"parameters became NaN or infinite at step 6"):
        train.check_state_finite(bad, 6, ckpt)
    train.check_state_finite(bad.replace(params={"w": np.ones(2, np.float32)}), 6, ckpt)
    ckpt.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, trainer, image_folder):
    """Returns make(**overrides): the worker config on a folder of 16 random images."""
    root = str(tmp_path_factory.mktemp("folder"))
    image_folder(root, per_class=8)
    return lambda **overrides: trainer.config(root, **overrides)


def _save_checkpoint_for(config, workdir: str) -> None:
    """Writes a step-2 checkpoint of a fresh state for `config` (no training needed)."""
    model = build_model(config)
    tx = optim.make_optimizer(config.learning_rate, 4)
    state = TrainState.create(model.init_attention(jax.random.key(0)), tx)
    ckpt = checkpoints.Checkpointer(workdir, identity=checkpoints.describe(config))
    ckpt.save(2, state, force=True)
    ckpt.close()


@pytest.mark.parametrize("key, value, message", [
    ("model.backbone", "resnet34", "backbone: checkpoint has 'resnet18', config asks for "
                                   "'resnet34'"),
    ("model.num_classes", 7, "num_classes: checkpoint has 10, config asks for 7"),
])
def test_checkpoint_of_another_backbone_or_class_count_is_refused(folder, tmp_path, key, value,
                                                                  message, checkpoint_steps):
    workdir = str(tmp_path / "run")
    _save_checkpoint_for(folder(), workdir)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=re.escape(message)) as e:
        train.train_and_evaluate(folder(**{key: value}), workdir)
    assert "Use another --workdir" in str(e.value)
    assert checkpoint_steps(workdir) == [2]  # the checkpoint is left as it was


def test_unknown_layer_name_lists_the_valid_ones(folder, tmp_path):
    config = folder(**{"model.layers": ("layer2", "layer9")})
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer9'\] for backbone "
                                         r"'resnet18'\. Valid names .*layer3, layer4"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_empty_weights_path_says_what_to_set(folder, tmp_path):
    config = folder(**{"model.backbone_weights": ""})
    with pytest.raises(ValueError, match="backbone_weights is empty.*'random'"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_that_does_not_divide_over_the_devices_gives_the_fix(folder, tmp_path):
    assert jax.device_count() == 8  # tests/conftest.py
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices.*"
                                         r"set --config\.batch_size to a multiple of 8 "
                                         r"\(e\.g\. 8 or 16\)"):
        train.train_and_evaluate(folder(batch_size=12), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("flag, message", [
    ("--config.model.not_a_key=1",
     "unknown config key 'config.model.not_a_key' in '--config.model.not_a_key=1': config.model "
     "has no field 'not_a_key'. Its fields: backbone, backbone_kwargs,"),
    ("--config.modle.backbone=vgg16",
     "config has no field 'modle'. Did you mean config.model?"),
])
def test_unknown_config_key_on_the_command_line_is_named(tmp_path, flag, message, trainer):
    env = trainer.env(devices=1)
    cmd = [sys.executable, "-m", "tame_jax.train", f"--config={trainer.config_file}",
           f"--workdir={tmp_path}", flag]
    r = subprocess.run(cmd, env=env, cwd=trainer.repo, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("key, value, message", [
    ("eval.road_variant", "grad-cam", r"config\.eval\.road_variant='grad-cam' is not a known "
                                      r"option; choose one of \('gradcam', 'pixels'\)"),
    ("eval.insertion_variant", "petsiuk", r"insertion_variant='petsiuk'.*\('rise', 'pixels'\)"),
    ("eval.pointing_classes", ("gt",), r"pointing_classes=\('gt',\): use one or both of "
                                       r"\('label', 'predicted'\)"),
    ("eval.insertion_step", -5, r"insertion_step=-5: use a number of pixels per step"),
    ("eval.metrics", ("ad_ic", "roadd"), r"unknown \['roadd'\]; registered metrics are"),
])
def test_unknown_metric_option_fails_before_anything_is_written(folder, tmp_path, key, value,
                                                                message):
    from tame_jax import demo, evaluation

    config = folder(**{key: value, "data.eval_split": "train"})
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=message):
        evaluation.run(config, str(tmp_path / "run"), method="gradcam", out_dir=str(out))
    with pytest.raises(ValueError, match=message):  # the demo: before data and training
        demo.run(config, str(tmp_path / "demo"), ("gradcam",))
    assert not out.exists() and not (tmp_path / "demo").exists()


def test_pointing_game_on_data_without_boxes_names_the_fix(folder, tmp_path):
    from tame_jax import evaluation

    config = folder(**{"eval.metrics": ("ad_ic", "pointing"), "data.eval_split": "train",
                       "eval.batch_size": 8, "eval.num_examples": 8})
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"asks for \['pointing'\], which need object boxes, "
                                         r"but the eval data \(config\.data\.source='folder'"
                                         r".*remove them from config\.eval\.metrics"):
        evaluation.run(config, str(tmp_path / "run"), method="gradcam", out_dir=str(out))
    assert not out.exists()


def test_list_file_labels(folder, tmp_path):
    from tame_jax.data.sources import read_list_file

    root = folder().data.root
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    unlabelled = tmp_path / "paths.txt"
    unlabelled.write_text("\n".join(files) + "\n")
    config = folder(**{"data.source": "list", "data.list_file": str(unlabelled)})
    paths, labels = read_list_file(config, "train")
    assert len(paths) == 16 and labels == [-1] * 16  # paths only: labels unknown
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{files[0]} 3\n{files[1]}\n")
    with pytest.raises(ValueError, match=r"mixed\.txt:2: expected `relative/path label` like "
                                         r"the other lines"):
        read_list_file(folder(**{"data.source": "list", "data.list_file": str(mixed)}), "train")
    # Training on the data's labels (the reference's list files) needs them: one clear error,
    # before the workdir is made.
    config = folder(**{"data.source": "list", "data.list_file": str(unlabelled),
                       "model.backbone_mode": "train", "model.train_labels": "data"})
    with pytest.raises(ValueError, match=r"train_labels='data' needs a label for every training "
                                         r"image, but 16 of the 16 lines of the list file have "
                                         r"none: write `relative/path label` lines.*or set "
                                         r"config\.model\.train_labels='model'"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"train_labels='truth'; choose one of \('model', "
                                         r"'data'\)"):
        train.train_and_evaluate(folder(**{"model.train_labels": "truth"}), str(tmp_path / "r"))
