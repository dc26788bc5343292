"""Explaining users' images: the eval pixels without TensorFlow, the Explainer API (uint8, float,
PIL, paths, any size, batches), one-pass top-k maps, baselines through the same interface, the
command line on a folder tree, full-size overlays, and portable workdirs.

The workdir is made without training (a saved initial state): what is tested here is the
plumbing from images to maps and files, which does not depend on trained values.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tame_jax import checkpoints, explain, inputs, optim, viz, weights, workdirs
from tame_jax.config import default_config
from tame_jax.model import Model, build_model
from tame_jax.sharding import make_mesh
from tame_jax.train_step import init_state

SHAPES = ("circle", "square", "triangle", "star", "cross",
          "ring", "rhombus", "crescent", "heart", "bowtie")


def _config(weights_path: str = "random"):
    c = default_config()
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {"width": 8}
    c.model.num_classes = 10
    c.model.class_names = SHAPES
    c.model.backbone_weights = weights_path
    c.data.image_size = 32
    c.data.resize_size = 40
    return c


def make_workdir(root: str) -> tuple[str, str]:
    """Returns (workdir, weights file): root/proj/runs/r (a saved initial attention state) and
    root/proj/weights/r18.npz (random backbone weights)."""
    model = build_model(_config())
    wfile = os.path.join(root, "proj", "weights", "r18.npz")
    os.makedirs(os.path.dirname(wfile))
    np.savez(wfile, **weights.flax_to_torchvision(jax.device_get(model.backbone_vars)))
    config = _config(wfile)
    workdir = os.path.join(root, "proj", "runs", "r")
    os.makedirs(workdir)
    state = init_state(model, optim.make_optimizer(1e-3, 10), jax.random.key(1), make_mesh())
    # BatchNorm statistics away from (0, 1), so that a wrong restore would show
    stats = jax.tree_util.tree_map(lambda x: x + 0.3, state.batch_stats)
    state = state.replace(batch_stats=stats)
    ckpt = checkpoints.Checkpointer(workdir, identity=checkpoints.describe(config))
    ckpt.save(1, state, force=True)
    ckpt.close()
    workdirs.write_config(config, workdir)
    return workdir, wfile


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("explain")))[0]


@pytest.fixture(scope="module")
def explainer(workdir):
    return explain.Explainer.from_checkpoint(workdir, batch_size=4)


def _random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# ----------------------------------------------------------------------------- pixels


def _pipeline(raw: bytes, size: int, resize: int) -> np.ndarray:
    """Returns the eval pipeline's image (tf.data preprocessing) of an encoded image."""
    import tensorflow as tf

    from tame_jax.data.preprocess import make_preprocess

    c = default_config()
    c.data.image_size, c.data.resize_size = size, resize
    out = make_preprocess(c, train=False)({"raw": tf.constant(raw), "label": 0, "pos": 0})
    return out["image"].numpy()


@pytest.mark.parametrize("h,w,size,resize", [(37, 53, 16, 20), (300, 200, 224, 256),
                                              (100, 401, 64, 64), (20, 30, 24, 28)])
def test_preprocess_gives_the_eval_pipelines_pixels_on_non_square_images(h, w, size, resize):
    image = _random_images([(h, w)], seed=h)[0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    expected = _pipeline(buf.getvalue(), size, resize)
    crop, g = inputs.preprocess(image, size, resize)
    np.testing.assert_allclose(crop, expected, atol=2e-6)  # float32 rounding of the filter
    # the same from float input in [0, 1]
    np.testing.assert_allclose(inputs.preprocess(image / 255.0, size, resize)[0], expected,
                               atol=2e-6)
    assert (g.height, g.width, g.size) == (h, w, size)
    assert min(g.resized_height, g.resized_width) == resize


def test_explainer_prepares_uint8_float_pil_and_paths_like_the_pipeline(explainer, tmp_path):
    image = _random_images([(45, 70)])[0]
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    expected = _pipeline(path.read_bytes(), 32, 40)
    for item in (image, image / 255.0, Image.fromarray(image), str(path), path):
        batch, (g,) = explainer.prepare([item])
        np.testing.assert_allclose(batch[0], expected, atol=2e-6, err_msg=type(item).__name__)
    # a JPEG decodes as TensorFlow decodes it (integer DCT, as PIL's default)
    Image.fromarray(image).save(tmp_path / "x.jpg", quality=90)
    jpeg = _pipeline((tmp_path / "x.jpg").read_bytes(), 32, 40)
    np.testing.assert_allclose(explainer.prepare(str(tmp_path / "x.jpg"))[0][0], jpeg,
                               atol=2e-6)
    # the crop box in the original: resized to 40 x 62, crop 32 at (4, 15)
    assert g.box == pytest.approx((4 * 45 / 40, 15 * 70 / 62, 36 * 45 / 40, 47 * 70 / 62))


def test_float_images_above_one_and_bad_shapes_are_refused(explainer):
    image = np.full((40, 50, 3), 200.0, np.float32)
    image[0, 0] = 0
    with pytest.raises(ValueError, match=r"image 0 is a float array with values in \[0, 200\]: "
                                         r"float images must be in \[0, 1\]"):
        explainer(image)
    with pytest.raises(ValueError, match="expected \\(H, W, 3\\)"):
        explainer([np.zeros((10, 10, 5), np.uint8)])
    with pytest.raises(ValueError, match="unknown class name 'stra'. Closest names: 'star'"):
        explainer(np.zeros((32, 32, 3), np.uint8), targets="stra")
    with pytest.raises(ValueError, match=r"class 10 is out of range: classes must be in "
                                         r"\[0, 10\)"):
        explainer(np.zeros((32, 32, 3), np.uint8), targets=10)


# ----------------------------------------------------------------------------- maps


def test_top_k_maps_come_from_one_pass_and_equal_the_single_class_maps(workdir):
    config = workdirs.load_config(workdir)
    model = build_model(config)
    av, _ = checkpoints.restore_attention(config, workdir, model)
    x = jnp.asarray(np.stack([c / 255.0 for c in _random_images([(32, 32)] * 3, seed=3)]),
                    jnp.float32)
    maps, classes, logits = jax.jit(Model.explain_top_k, static_argnums=4)(model, av, x, None, 3)
    np.testing.assert_array_equal(classes, np.argsort(-np.asarray(logits), axis=1)[:, :3])
    np.testing.assert_allclose(logits, model.classify(x), rtol=1e-5, atol=1e-5)
    for j in range(3):
        single = model.explain(av, x, classes[:, j])[0]
        np.testing.assert_allclose(maps[:, j], single, atol=1e-5)


def test_explainer_batches_pad_and_compile_once(explainer):
    images = _random_images([(32 + 3 * i, 60 - 2 * i) for i in range(6)], seed=1)
    explain._jitted.cache_clear()
    small = explain.Explainer(explainer.config, explainer.model, explainer.attention_vars,
                              batch_size=4)
    e = small.explain(images, top_k=2)  # 6 images: batches of 4, the last padded
    (fn,) = [explain._jitted(small.method, small.options, 2)]
    assert fn._cache_size() == 1  # one program for both batches
    whole = explain.Explainer(explainer.config, explainer.model, explainer.attention_vars,
                              batch_size=8).explain(images, top_k=2)
    np.testing.assert_allclose(e.maps, whole.maps, atol=1e-5)
    np.testing.assert_array_equal(e.classes, whole.classes)
    assert e.maps.shape == (6, 2, 32, 32) and e.probabilities.shape == (6, 10)
    np.testing.assert_allclose(e.probabilities.sum(-1), 1, atol=1e-5)
    # targets: one for all, one per image, by name or index
    star = explainer(images[:2], targets="star")
    np.testing.assert_allclose(star, explainer(images[:2], targets=[3, "Star"]), atol=1e-6)
    assert star.shape == (2, 32, 32)


def test_baseline_has_the_same_interface_and_the_evaluation_maps(explainer):
    from tame_jax import cams
    from tame_jax.image_ops import minmax_normalize

    gc = explain.Explainer.baseline("gradcam", config=explainer.config, batch_size=4)
    images = _random_images([(40, 40), (32, 50)], seed=2)
    e = gc.explain(images)
    batch, _ = gc.prepare(images)
    x = jnp.asarray(batch)
    classes = jnp.argmax(gc.model.classify(x), -1)
    expected = minmax_normalize(cams.cam("gradcam", gc.model, x, classes, layer="layer4"))
    np.testing.assert_allclose(e.maps[:, 0], expected, atol=1e-5)
    np.testing.assert_array_equal(e.classes[:, 0], classes)
    with pytest.raises(ValueError, match="needs a trained attention module"):
        explain.Explainer(explainer.config, explainer.model, None, method="tame")


def test_map_to_original_places_the_crop_and_leaves_the_rest_blank():
    # 20 x 40 original, shorter side -> 10 (10 x 20), centre 10 crop at left 5: the crop
    # covers original columns 10..29; a map equal to its column index c maps back to
    # c = (x + 0.5) / 2 - 0.5 - 5 at original column x.
    g = inputs.eval_geometry(20, 40, 10, 10)
    assert (g.resized_height, g.resized_width, g.top, g.left) == (10, 20, 0, 5)
    assert g.box == (0.0, 10.0, 20.0, 30.0)
    crop_map = np.tile(np.arange(10, dtype=np.float32), (10, 1))
    full = inputs.map_to_original(crop_map, g)
    assert full.shape == (20, 40)
    assert np.isnan(full[:, :10]).all() and np.isnan(full[:, 30:]).all()
    x = np.arange(10, 30)
    expected = np.clip((x + 0.5) / 2 - 0.5 - 5, 0, 9)
    np.testing.assert_allclose(full[5, 10:30], expected, atol=1e-6)
    np.testing.assert_allclose(inputs.map_to_original(crop_map, inputs.identity_geometry(10)),
                               crop_map)


def test_overlay_uses_matplotlibs_jet_and_blends():
    import matplotlib

    lut = viz.colormap_lut("jet")
    reference = matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255
    np.testing.assert_allclose(lut, reference, atol=0.51)
    image = np.full((2, 3, 3), 100, np.uint8)
    heat = np.array([[0.0, 0.5, 1.0], [np.nan, 0.25, 0.999]], np.float32)
    out = viz.overlay(image, heat, alpha=0.4)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    for (i, j), v in np.ndenumerate(heat):
        if np.isnan(v):
            np.testing.assert_array_equal(out[i, j], 100)  # outside the crop: untouched
        else:  # matplotlib's index: floor(256 v), clipped
            colour = lut[min(int(v * 256), 255)].astype(float)
            np.testing.assert_allclose(out[i, j], np.round(0.6 * 100 + 0.4 * colour), atol=1)
    np.testing.assert_array_equal(viz.overlay(image / 255.0, heat, alpha=0.4), out)
    with pytest.raises(ValueError, match="same size"):
        viz.overlay(image, np.zeros((3, 3)))


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def photo_tree(tmp_path):
    """photos/{a.png, a.jpg, b.png (non-square 48 x 80), sub/a.png, sub/broken.jpg, notes.txt}."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    imgs = _random_images([(40, 40), (36, 52), (48, 80), (40, 33)], seed=5)
    Image.fromarray(imgs[0]).save(root / "a.png")
    Image.fromarray(imgs[1]).save(root / "a.jpg")
    Image.fromarray(imgs[2]).save(root / "b.png")
    Image.fromarray(imgs[3]).save(root / "sub" / "a.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_mirrors_the_tree_skips_broken_files_and_keeps_outputs(workdir, photo_tree,
                                                                   tmp_path, capsys):
    out = tmp_path / "maps"
    args = ["--workdir", workdir, str(photo_tree), "--out", str(out), "--batch_size", "2",
            "--top_k", "2", "--save", "image"]
    assert explain.main(args) == 1  # one file could not be read
    err = capsys.readouterr().err
    assert "1 of 5 files could not be read" in err and "sub/broken.jpg" in err
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["a.jpg.tame.npz", "a.jpg.tame.png", "a.png.tame.npz", "a.png.tame.png",
                     "b.png.tame.npz", "b.png.tame.png", "sub/a.png.tame.npz",
                     "sub/a.png.tame.png"]
    # full-size overlay: two panels of the original 48 x 80 (+ a 4 px gap, a caption line)
    png = np.asarray(Image.open(out / "b.png.tame.png"))
    assert png.shape == (48 + 14, 2 * 80 + 4, 3)
    with np.load(out / "b.png.tame.npz") as z:
        assert z["maps"].shape == (2, 32, 32) and z["classes"].shape == (2,)
        np.testing.assert_allclose(z["probabilities"].sum(), 1, atol=1e-5)
        # resized to 40 x 66 (shorter side 40), crop 32 at (4, 17)
        np.testing.assert_allclose(z["box"], (4 * 48 / 40, 17 * 80 / 66, 36 * 48 / 40,
                                              49 * 80 / 66), rtol=1e-6)
        saved = z["maps"]
    # the same maps as the API's
    ex = explain.Explainer.from_checkpoint(workdir)
    np.testing.assert_allclose(ex.explain(str(photo_tree / "b.png"), top_k=2).maps[0], saved,
                               atol=1e-5)
    # the left and right margins the model did not see are the original pixels
    original = np.asarray(Image.open(photo_tree / "b.png"))
    np.testing.assert_array_equal(png[14:, :20], original[:, :20])
    np.testing.assert_array_equal(png[14:, 60:80], original[:, 60:])
    np.testing.assert_array_equal(png[14:18, :80], original[:4])
    assert np.abs(png[20:40, 25:55].astype(int) - original[6:26, 25:55]).mean() > 10

    # a second run refuses to overwrite, writes nothing; --overwrite replaces
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert explain.main(args) == 2
    assert "8 output file(s) exist already" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert explain.main([*args, "--overwrite", "--overlay", "crop"]) == 1
    assert np.asarray(Image.open(out / "b.png.tame.png")).shape == (32 + 14, 2 * 32 + 4, 3)


def test_cli_globs_classes_by_name_one_npz_and_bad_input(workdir, photo_tree, tmp_path,
                                                         capsys):
    out = tmp_path / "maps"
    code = explain.main(["--workdir", workdir, str(photo_tree / "*.png"), "--out", str(out),
                         "--class", "star,1", "--save", "run", "--overlay", "none"])
    assert code == 0
    with np.load(out / "tame_run.npz") as z:
        assert list(z["path"]) == ["a.png", "b.png"]
        assert z["maps"].shape == (2, 2, 32, 32) and z["classes"].tolist() == [[3, 1], [3, 1]]
        assert z["box"].shape == (2, 4) and z["class_names"][3] == "star"
    capsys.readouterr()
    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    assert explain.main(["--workdir", workdir, str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no images in this folder or below" in capsys.readouterr().err
    assert explain.main(["--workdir", workdir, str(photo_tree), "--out", str(tmp_path / "o"),
                         "--class", "stra"]) == 2
    assert "unknown class name 'stra'. Closest names: 'star'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written before the error
    assert explain.main(["--workdir", workdir, str(tmp_path / "missing.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_baseline_needs_no_checkpoint(photo_tree, tmp_path, capsys):
    model = build_model(_config())
    wfile = tmp_path / "r18.npz"
    np.savez(wfile, **weights.flax_to_torchvision(jax.device_get(model.backbone_vars)))
    out = tmp_path / "gc"
    # resnet18 at full width: the default backbone_kwargs of a --backbone baseline
    code = explain.main(["--backbone=resnet18", f"--backbone_weights={wfile}", "--num_classes=10",
                         "--image_size=32", "--method=gradcam", str(photo_tree / "b.png"),
                         "--out", str(out)])
    assert code == 2  # the width-8 file does not fit a width-64 resnet18: a clear error
    assert "does not fit backbone 'resnet18'" in capsys.readouterr().err
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from tests.test_explain import _config\n\n\ndef get_config():\n"
                   f"    return _config({str(wfile)!r})\n")
    code = explain.main([f"--config={cfg}", "--method=gradcam", str(photo_tree / "b.png"),
                         "--out", str(out)])
    assert code == 0 and (out / "b.png.gradcam.png").is_file()
    assert explain.main(["--method=tame", str(photo_tree / "b.png"), "--out", str(out)]) == 2
    assert "needs a trained attention module" in capsys.readouterr().err


# ----------------------------------------------------------------------------- workdirs


def test_workdir_moved_elsewhere_still_explains_and_warns_on_other_weights(tmp_path):
    workdir, wfile = make_workdir(str(tmp_path / "a"))
    saved = workdirs.load_config(workdir, check=False)
    assert saved.model.backbone_weights == wfile  # recorded absolute
    assert saved.model.backbone_weights_relative == os.path.join("..", "..", "weights",
                                                                 "r18.npz")
    assert saved.model.backbone_weights_sha256 == workdirs.file_sha256(wfile)
    images = _random_images([(40, 56)], seed=9)
    before = explain.Explainer.from_checkpoint(workdir)(images)

    shutil.move(str(tmp_path / "a" / "proj"), str(tmp_path / "b"))  # the project moved
    moved = str(tmp_path / "b" / "runs" / "r")
    assert not os.path.exists(wfile)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file: no warning
        after = explain.Explainer.from_checkpoint(moved)(images)
    np.testing.assert_allclose(after, before, atol=1e-6)

    # other weights: explained, with a warning naming the mismatch
    other = tmp_path / "other.npz"
    sd = dict(np.load(tmp_path / "b" / "weights" / "r18.npz"))
    sd["fc.bias"] = sd["fc.bias"] + 1.0
    np.savez(other, **sd)
    with pytest.warns(UserWarning, match="trained with"):
        explain.Explainer.from_checkpoint(moved, backbone_weights=str(other))
    os.remove(tmp_path / "b" / "weights" / "r18.npz")
    with pytest.raises(FileNotFoundError, match="Pass --backbone_weights=PATH"):
        explain.Explainer.from_checkpoint(moved)


def test_evaluate_defaults_to_the_workdirs_config_with_overrides(workdir):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "tame_jax.evaluate", f"--workdir={workdir}",
                        "--config.eval.num_examples=7", "--print_config"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| `model.backbone` | `'resnet18'` |" in r.stdout  # from the workdir's config.json
    assert "| `eval.num_examples` | `7` |" in r.stdout  # the override applied
    assert "| `data.image_size` | `32` |" in r.stdout


def test_paths_that_are_urls_are_kept_as_urls(tmp_path):
    import hashlib

    assert workdirs.absolute("gs://bucket/runs/r") == "gs://bucket/runs/r"
    assert workdirs.join("gs://bucket/runs/r/", "config.json") == "gs://bucket/runs/r/config.json"
    assert workdirs.join(str(tmp_path), "a") == os.path.join(str(tmp_path), "a")
    assert workdirs.absolute("~/x") == os.path.expanduser("~/x")
    (tmp_path / "w.npz").write_bytes(b"weights")
    c = _config(str(tmp_path / "w.npz"))
    workdirs.record_backbone_weights(c, "gs://bucket/runs/r")  # no relative path across them
    assert c.model.backbone_weights == str(tmp_path / "w.npz")
    assert c.model.backbone_weights_relative == ""
    assert c.model.backbone_weights_sha256 == hashlib.sha256(b"weights").hexdigest()


def test_explain_prints_the_config_it_would_use(workdir, capsys):
    from tame_jax.config import FIELDS

    assert explain.main(["--workdir", workdir, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "| `model.backbone` | `'resnet18'` |" in out and "| `data.image_size` | `32` |" in out
    assert len(out.splitlines()) == len(FIELDS) + 2  # header, rule, one row per field


def test_explaining_never_imports_tensorflow(workdir, photo_tree, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, tame_jax\n"
        "assert 'jax' not in sys.modules, 'import tame_jax is not light'\n"
        "from tame_jax import Explainer, overlay\n"
        "from tame_jax import explain\n"
        f"code = explain.main([{'--workdir=' + workdir!r}, {str(photo_tree)!r}, "
        f"'--out', {str(tmp_path / 'o')!r}])\n"
        "assert code == 1, code  # the broken file\n"
        "assert 'tensorflow' not in sys.modules, 'explain imported TensorFlow'\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "b.png.tame.png").is_file()
