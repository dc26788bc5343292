"""Explain images: heat-map overlays from the command line, and the `Explainer` Python API.

    python -m tame_jax.explain --workdir=runs/demo photos/ more/*.jpg --out=maps/
    python -m tame_jax.explain --attention=resnet50_TTAME.ckpt photos/    # a released checkpoint
    python -m tame_jax.explain --backbone=resnet50 --backbone_weights=resnet50.safetensors \\
        --method=gradcam photos/                                          # a baseline
    python -m tame_jax.explain --workdir=runs/demo --split=test --out=maps/  # a data set split

Inputs are files, folders (searched recursively for images) and globs. Outputs mirror the
input tree under --out (`photos/a/x.jpg` -> `maps/a/x.jpg.tame.png`), so names never collide;
existing outputs are kept unless --overwrite. Images go through the model --batch_size at a
time (the last batch padded: one compiled program), and one forward pass gives each image's
classes, probabilities and maps. Overlays show the whole original image (the map taken back
through the resize and crop; what the model did not see is left untinted); --overlay=crop
shows the model's crop. --save=image writes an .npz per image (maps, classes, probabilities,
crop box), --save=run one .npz for the run. A file that cannot be read is skipped and listed
at the end, and the exit code is then 1.

Python (the habits of pytorch-grad-cam):

    explainer = Explainer.from_checkpoint("runs/demo")      # or Explainer.baseline("gradcam", ...)
    maps = explainer(images)                # (B, H, W) in [0, 1], each image's top-1 class
    maps = explainer(images, targets=[3, "star"])           # chosen classes, by index or name

`images`: paths, PIL images, uint8 arrays or float arrays in [0, 1], of any size: each is
resized and centre-cropped as evaluation does (an image already at the model's input size is
used as it is). TensorFlow is not imported here, so the command starts quickly.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import difflib
import functools
import glob
import os
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tame_jax import inputs, viz
from tame_jax.config import default_config

# ----------------------------------------------------------------------------- classes


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """Returns the 1000 ImageNet class names in torchvision's order."""
    text = resources.files("tame_jax").joinpath("assets/imagenet_classes.txt").read_text()
    return tuple(line for line in text.splitlines() if line)


def class_names_for(config: Any) -> tuple[str, ...]:
    """Returns the class names of a config: its own list, ImageNet's, or 'class k'."""
    names = config.model.get("class_names", None)
    if names:
        return tuple(names)
    if config.model.num_classes == 1000:
        return imagenet_class_names()
    return tuple(f"class {k}" for k in range(config.model.num_classes))


def class_index(target: int | str, names: Sequence[str]) -> int:
    """Returns the class index of an index or a name (case-insensitive); ValueError naming the
    closest names for an unknown one."""
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, int | np.integer):
        if not 0 <= int(target) < len(names):
            raise ValueError(f"class {int(target)} is out of range: classes must be in "
                             f"[0, {len(names)})")
        return int(target)
    lowered = [n.lower() for n in names]
    if target.lower() in lowered:
        return lowered.index(target.lower())
    close = difflib.get_close_matches(target.lower(), lowered, n=5, cutoff=0.5)
    hint = (f" Closest names: {', '.join(repr(names[lowered.index(c)]) for c in close)}."
            if close else f" Class names are like {', '.join(repr(n) for n in names[:5])}.")
    raise ValueError(f"unknown class name {target!r}.{hint}")


def _class_matrix(targets: Any, n: int, names: Sequence[str]) -> np.ndarray:
    """Returns targets as (n, k) class indices: one target for all images, one per image, or
    k per image."""
    if isinstance(targets, int | np.integer | str):
        return np.full((n, 1), class_index(targets, names), np.int32)
    rows = list(targets)
    if len(rows) != n:
        raise ValueError(f"targets has {len(rows)} entries for {n} images: give one target "
                         "for all, one per image, or a list of classes per image")
    rows = [[r] if isinstance(r, int | np.integer | str) else list(r) for r in rows]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every image needs the same number of targets")
    return np.asarray([[class_index(t, names) for t in r] for r in rows], np.int32)


# ----------------------------------------------------------------------------- the compiled step


def _explain_batch(model: Any, attention_vars: Any, images: jax.Array, classes: jax.Array | None,
                   key: jax.Array, *, method: str, options: tuple, top_k: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (maps (B, k, H, W) in [0, 1], classes (B, k), probabilities (B, K))."""
    from tame_jax import evaluation

    m = evaluation.get_method(method)
    if m.explain_top_k is not None:  # maps and classes from one forward pass
        maps, classes, logits = m.explain_top_k(model, attention_vars, images, classes, top_k)
    else:
        logits = model.classify(images)
        if classes is None:
            classes = jax.lax.top_k(logits, top_k)[1]
        b, k = classes.shape
        x = jnp.repeat(images, k, axis=0) if k > 1 else images
        maps = m.maps(model, attention_vars, x, classes.reshape(-1), key, **dict(options))
        maps = maps.reshape(b, k, *images.shape[1:3])
    return maps, classes, jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@functools.cache
def _jitted(method: str, options: tuple, top_k: int) -> Any:
    return jax.jit(functools.partial(_explain_batch, method=method, options=options,
                                     top_k=top_k))


@dataclasses.dataclass
class Explanation:
    """Explanations of B images: k maps each (the model's crop), what they explain, and where
    the crop lies in each original image."""

    maps: np.ndarray  # (B, k, S, S) float32 in [0, 1]
    classes: np.ndarray  # (B, k) int32, the explained classes (top-1 first by default)
    probabilities: np.ndarray  # (B, K) the softmax of the backbone's logits
    geometries: list[inputs.Geometry]  # how each crop was cut from its original
    class_names: tuple[str, ...] = ()

    @property
    def boxes(self) -> np.ndarray:
        """Returns the crops in the originals: (B, 4) as (ymin, xmin, ymax, xmax) pixels."""
        return np.asarray([g.box for g in self.geometries], np.float32).reshape(-1, 4)

    def on_original(self, i: int) -> np.ndarray:
        """Returns image i's maps on its original image: (k, H, W), NaN outside the crop."""
        return inputs.map_to_original(self.maps[i], self.geometries[i])

    def titles(self, i: int) -> list[str]:
        """Returns 'name (p=0.93)' for each map of image i."""
        return [f"{self.class_names[c] if self.class_names else c} "
                f"(p={self.probabilities[i, c]:.2f})" for c in self.classes[i]]


# ----------------------------------------------------------------------------- the API


class Explainer:
    """Explanation maps of any registered method (TAME or a baseline) for images of any kind.

    `Explainer(config, model, attention_vars, method="tame")`, or the constructors
    `from_checkpoint(workdir)`, `from_reference_release(path)` and `baseline(method, ...)`.
    Calls are compiled once per batch shape: up to `batch_size` images go through at once,
    more are cut into batches of `batch_size` (the last padded).
    """

    def __init__(self, config: Any, model: Any, attention_vars: Any = None, *,
                 method: str = "tame", batch_size: int = 32):
        from tame_jax import evaluation

        m = evaluation.get_method(method)
        if m.trained and attention_vars is None:
            raise ValueError(f"method {method!r} needs a trained attention module: use "
                             "Explainer.from_checkpoint(workdir) or "
                             "Explainer.from_reference_release(path)")
        self.config, self.model, self.attention_vars = config, model, attention_vars
        self.method, self.batch_size = method, max(1, int(batch_size))
        self.options = tuple(sorted(m.options(config).items()))
        self.class_names = class_names_for(config)
        self.image_size = int(config.data.image_size)
        self.resize_size = int(config.data.get("resize_size") or self.image_size)
        self._key = jax.random.key(int(config.get("seed", 0)))
        self._calls = 0

    # --- constructors

    @classmethod
    def from_checkpoint(cls, workdir: str, step: int | None = None, *,
                        backbone_weights: str | None = None, method: str = "tame",
                        batch_size: int = 32) -> Explainer:
        """Returns the explainer of a training workdir (its config.json and checkpoint); a
        baseline `method` uses the workdir's backbone and needs no checkpoint."""
        from tame_jax import checkpoints, evaluation, workdirs
        from tame_jax.model import build_model

        config = workdirs.load_config(workdir, backbone_weights=backbone_weights)
        model = build_model(config)
        attention_vars = None
        if evaluation.get_method(method).trained:
            attention_vars, _ = checkpoints.restore_attention(config, workdir, model, step)
        return cls(config, model, attention_vars, method=method, batch_size=batch_size)

    @classmethod
    def from_reference_release(cls, path: str, *, backbone: str | None = None,
                               backbone_weights: str = "", layers: Sequence[str] | None = None,
                               num_classes: int | None = None, image_size: int = 224,
                               backbone_kwargs: dict | None = None,
                               batch_size: int = 32) -> Explainer:
        """Returns the explainer of an attention checkpoint of the reference releases: a TAME
        .pt/.pth/.npz, or a T-TAME Lightning .ckpt (whose backbone weights and backbone name
        it carries; `backbone_weights` then overrides them)."""
        from tame_jax import backbones, weights
        from tame_jax.model import build_model

        attention_sd, backbone_sd, hyper = weights.load_reference_release(path)
        trained_on = hyper.get("model_name")
        if backbone is None:
            backbone = trained_on or "resnet50"
        elif trained_on and trained_on != backbone:
            raise ValueError(f"{path} was trained on backbone {trained_on!r} (its "
                             f"hyper_parameters say so), not {backbone!r}: pass "
                             f"--backbone={trained_on}")
        spec = backbones.get_spec(backbone)
        if layers is None:
            hyper_layers = tuple(hyper.get("layers") or ())
            layers = hyper_layers if hyper_layers and all(
                n in spec.layer_names for n in hyper_layers) else spec.default_layers
        config = default_config()
        config.model.backbone = backbone
        config.model.backbone_kwargs = dict(backbone_kwargs or {})
        config.model.layers = tuple(layers)
        config.model.num_classes = int(num_classes or hyper.get("num_classes") or 1000)
        config.data.image_size = image_size
        config.data.resize_size = max(image_size, config.data.resize_size * image_size // 224)
        from_file = not backbone_weights and bool(backbone_sd)
        config.model.backbone_weights = (
            "random" if from_file else backbone_weights or default_backbone_weights(backbone))
        model = build_model(config)
        if from_file:  # the backbone stored in the checkpoint itself
            model = model.replace(backbone_vars=spec.convert(backbone_sd, model.backbone_vars))
            config.model.backbone_weights = f"{path} (generic.body.)"
        template = jax.eval_shape(model.init_attention, jax.random.key(0))
        attention_vars = weights.tame_variables_from_state_dict(attention_sd, template)
        return cls(config, model, attention_vars, batch_size=batch_size)

    @classmethod
    def baseline(cls, method: str, *, backbone: str = "resnet50", backbone_weights: str = "",
                 num_classes: int = 1000, image_size: int = 224, layer: str = "",
                 backbone_kwargs: dict | None = None, config: Any = None,
                 batch_size: int = 32) -> Explainer:
        """Returns an explainer of a baseline (gradcam, gradcampp, scorecam, ablationcam, rise)
        on a backbone: no attention checkpoint. `config` (e.g. a configs/*.py config) replaces
        the backbone arguments."""
        from tame_jax.model import build_model

        if config is None:
            config = default_config()
            config.model.backbone = backbone
            config.model.backbone_kwargs = dict(backbone_kwargs or {})
            config.model.num_classes = num_classes
            config.model.backbone_weights = backbone_weights or default_backbone_weights(
                backbone)
            config.data.image_size = image_size
            config.data.resize_size = max(image_size,
                                          config.data.resize_size * image_size // 224)
        if layer:
            config.eval.cam_layer = layer
        from tame_jax import backbones

        config.model.layers = backbones.get_spec(config.model.backbone).default_layers
        return cls(config, build_model(config), None, method=method, batch_size=batch_size)

    # --- inputs

    def prepare(self, images: Any) -> tuple[np.ndarray, list[inputs.Geometry]]:
        """Returns (model inputs (B, S, S, 3) float32 in [0, 1], geometries) of images: one
        image or a sequence (paths, PIL images, arrays) or a (B, H, W, 3) array."""
        items = _as_items(images)
        crops, geoms = [], []
        for i, item in enumerate(items):
            crop, g = self.prepare_one(inputs.to_rgb_array(item, f"image {i}"))
            crops.append(crop)
            geoms.append(g)
        return np.stack(crops), geoms

    def prepare_one(self, image: np.ndarray) -> tuple[np.ndarray, inputs.Geometry]:
        """Returns (model input (S, S, 3) float32, geometry) of an (h, w, 3) uint8/float image."""
        s = self.image_size
        if image.shape[:2] == (s, s):  # already a model input
            x = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
            return x, inputs.identity_geometry(s)
        return inputs.preprocess(image, s, self.resize_size)

    # --- explaining

    def explain_batch(self, batch: np.ndarray, classes: np.ndarray | None = None,
                      top_k: int = 1, pad_to: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (maps (B, k, S, S), classes (B, k), probabilities (B, K)) of model inputs
        (B, S, S, 3), padded to `pad_to` rows (one compiled program for every batch)."""
        n = len(batch)
        pad = max(0, (pad_to or n) - n)
        if pad:
            batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
            if classes is not None:
                classes = np.concatenate([classes, np.repeat(classes[-1:], pad, axis=0)])
        k = top_k if classes is None else classes.shape[1]
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        fn = _jitted(self.method, self.options, int(k))
        maps, cls_, probs = fn(self.model, self.attention_vars, jnp.asarray(batch),
                               None if classes is None else jnp.asarray(classes, jnp.int32), key)
        return np.asarray(maps)[:n], np.asarray(cls_)[:n], np.asarray(probs)[:n]

    def explain(self, images: Any, targets: Any = None, *, top_k: int = 1) -> Explanation:
        """Returns the Explanation of images for targets (None: each image's top_k classes;
        a class index or name for all; one per image; or k per image)."""
        batch, geoms = self.prepare(images)
        n = len(batch)
        classes = None if targets is None else _class_matrix(targets, n, self.class_names)
        bs = self.batch_size
        pad_to = bs if n > bs else None  # one shape for all the batches of a large call
        out = [self.explain_batch(batch[i:i + bs], None if classes is None else
                                  classes[i:i + bs], top_k, pad_to) for i in range(0, n, bs)]
        maps, cls_, probs = (np.concatenate(parts) for parts in zip(*out, strict=True))
        return Explanation(maps, cls_, probs, geoms, self.class_names)

    def __call__(self, images: Any, targets: Any = None) -> np.ndarray:
        """Returns maps (B, H, W) in [0, 1] (the model's crop) for the targets (default top-1);
        (B, k, H, W) when targets give k > 1 classes per image."""
        maps = self.explain(images, targets).maps
        return maps[:, 0] if maps.shape[1] == 1 else maps


def _as_items(images: Any) -> list[Any]:
    """Returns images as a list of single images."""
    if isinstance(images, str | os.PathLike) or hasattr(images, "convert"):
        return [images]
    if isinstance(images, np.ndarray | jax.Array):
        a = np.asarray(images)
        if a.ndim == 4:
            return list(a)
        if a.ndim == 3 and a.shape[-1] in (1, 3, 4) or a.ndim == 2:
            return [a]
        raise ValueError(f"images has shape {a.shape}; expected (B, H, W, 3) or (H, W, 3)")
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


def default_backbone_weights(backbone: str) -> str:
    """Returns the weights file a backbone uses when none is given: its registered
    `default_weights()` (e.g. weights shipped in an installed package), else ''.

    This is the one place where a backbone's default weights are found; with '' the model
    asks for --backbone_weights.
    """
    from tame_jax import backbones

    finder = getattr(backbones.get_spec(backbone), "default_weights", None)
    return str(finder() or "") if callable(finder) else ""


# ----------------------------------------------------------------------------- the command


def _magic(path: str) -> bool:
    return glob.has_magic(path)


def _is_image(path: str) -> bool:
    return path.lower().endswith(inputs.IMAGE_EXTENSIONS)


def expand_inputs(args: Sequence[str], exclude: str | None = None
                  ) -> tuple[list[tuple[str, str]], list[str]]:
    """Returns ([(file, output name relative to --out)], [problems]) for files, folders
    (recursive) and globs. Output names are the files' paths relative to the common folder of
    the inputs, so they never collide; files under `exclude` (the output folder) are skipped."""
    exclude = os.path.abspath(exclude) if exclude else None
    found: list[tuple[str, str]] = []  # (absolute file, anchor folder)
    problems = []
    for arg in args:
        if _magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            files = [m for m in matches if os.path.isfile(m)]
            for d in (m for m in matches if os.path.isdir(m)):
                files += _walk(d)
            anchor = _glob_root(arg)
            if not files:
                problems.append(f"{arg}: no file matches")
        elif os.path.isdir(arg):
            files, anchor = _walk(arg), arg
            if not files:
                problems.append(f"{arg}: no images in this folder or below (looked for "
                                f"{', '.join(inputs.IMAGE_EXTENSIONS)})")
        elif os.path.exists(arg):
            files, anchor = [arg], os.path.dirname(arg) or "."
        else:
            files, anchor = [], ""
            problems.append(f"{arg}: no such file or folder")
        found += [(os.path.abspath(f), os.path.abspath(anchor)) for f in files]
    if exclude:
        found = [(f, a) for f, a in found if os.path.commonpath([f, exclude]) != exclude]
    if not found:
        return [], problems
    root = os.path.commonpath([a for _, a in found])
    unique = dict.fromkeys(f for f, _ in found)  # a file given twice is explained once
    return [(f, os.path.relpath(f, root)) for f in unique], problems


def _walk(folder: str) -> list[str]:
    out = []
    for d, subdirs, files in os.walk(folder):
        subdirs.sort()
        out += [os.path.join(d, f) for f in sorted(files) if _is_image(f)]
    return out


def _glob_root(pattern: str) -> str:
    parts = []
    for part in pattern.split(os.sep):
        if _magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or "."


def output_paths(rel: str, out_dir: str, method: str, overlay: str, save: str) -> dict[str, str]:
    """Returns {'png': ..., 'npz': ...} for one input: its name under out_dir plus a suffix."""
    base = os.path.join(out_dir, rel)
    paths = {}
    if overlay != "none":
        paths["png"] = f"{base}.{method}.png"
    if save == "image":
        paths["npz"] = f"{base}.{method}.npz"
    return paths


def _load(path: str, explainer: Explainer) -> tuple[np.ndarray, np.ndarray, inputs.Geometry]:
    image = inputs.read_image(path)
    crop, g = explainer.prepare_one(image)
    return image, crop, g


def _batches(files: Sequence[tuple[str, str]], explainer: Explainer, size: int,
             pool: concurrent.futures.Executor) -> Iterator[list[tuple[str, Any]]]:
    """Yields lists of (rel, (image, crop, geometry) | error message), decoded one batch ahead."""
    def submit(chunk):
        return [(rel, pool.submit(_load, f, explainer)) for f, rel in chunk]

    chunks = [files[i:i + size] for i in range(0, len(files), size)]
    pending = submit(chunks[0]) if chunks else []
    for i in range(len(chunks)):
        current = pending
        pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
        out = []
        for rel, fut in current:
            try:
                out.append((rel, fut.result()))
            except inputs.UnreadableImageError as e:
                out.append((rel, str(e)))
        yield out


def _write_outputs(paths: dict[str, str], image: np.ndarray, crop: np.ndarray,
                   maps: np.ndarray, titles: list[str], g: inputs.Geometry, classes: np.ndarray,
                   probs: np.ndarray, mode: str, colormap: str) -> None:
    if "png" in paths:
        if mode == "full":
            base, heat = image, inputs.map_to_original(maps, g)
        else:
            base, heat = crop, maps
        viz.write_panels(paths["png"], [viz.overlay(base, h, colormap) for h in heat], titles)
    if "npz" in paths:
        os.makedirs(os.path.dirname(paths["npz"]), exist_ok=True)
        np.savez(paths["npz"], maps=maps.astype(np.float32), classes=classes,
                 probabilities=probs.astype(np.float32), box=np.asarray(g.box, np.float32),
                 image_size=np.asarray([g.height, g.width]))


def run_files(explainer: Explainer, files: Sequence[tuple[str, str]], out_dir: str, *,
              classes: Sequence[int | str] | None = None, top_k: int = 1,
              overlay: str = "full", save: str = "none", colormap: str = "jet",
              show_progress: bool = True) -> list[str]:
    """Explains files [(path, output name)] into out_dir; returns the files that failed."""
    from tame_jax import cli

    fixed = None
    if classes:
        idx = [class_index(c, explainer.class_names) for c in classes]
        fixed = np.tile(np.asarray(idx, np.int32), (explainer.batch_size, 1))
    failures: list[str] = []
    records: dict[str, list] = {k: [] for k in ("path", "maps", "classes", "probabilities",
                                                "box", "image_size")}
    bar = cli.progress_bar(len(files), "explain", unit="img", enabled=show_progress)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        writes = []
        for chunk in _batches(files, explainer, explainer.batch_size, pool):
            good = [(rel, v) for rel, v in chunk if not isinstance(v, str)]
            failures += [v for _, v in chunk if isinstance(v, str)]
            if good:
                batch = np.stack([v[1] for _, v in good])
                maps, cls_, probs = explainer.explain_batch(
                    batch, None if fixed is None else fixed[:len(good)], top_k,
                    pad_to=explainer.batch_size)
                ex = Explanation(maps, cls_, probs, [v[2] for _, v in good],
                                 explainer.class_names)
                for i, (rel, (image, crop, g)) in enumerate(good):
                    paths = output_paths(rel, out_dir, explainer.method, overlay, save)
                    writes.append(pool.submit(_write_outputs, paths, image, crop, maps[i],
                                              ex.titles(i), g, cls_[i], probs[i], overlay,
                                              colormap))
                    if save == "run":
                        for k, v in (("path", rel), ("maps", maps[i]), ("classes", cls_[i]),
                                     ("probabilities", probs[i]), ("box", g.box),
                                     ("image_size", (g.height, g.width))):
                            records[k].append(v)
            bar.update(len(chunk))
        for w in writes:
            w.result()
    bar.close()
    if save == "run" and records["path"]:
        os.makedirs(out_dir, exist_ok=True)
        np.savez(os.path.join(out_dir, f"{explainer.method}_run.npz"),
                 **{k: np.asarray(v) for k, v in records.items()},
                 class_names=np.asarray(explainer.class_names))
    return failures


def run_split(explainer: Explainer, split: str, out_dir: str, *,
              classes: Sequence[int | str] | None = None, top_k: int = 1,
              colormap: str = "jet", show_progress: bool = True) -> int:
    """Explains every image of a split of the explainer's data set (config.data) into
    OUT/<split>/<index in the split>.<method>.png (overlays on the model's crop); returns how
    many this process wrote.

    On several processes (a multi-host job), each reads and explains only its own shard of the
    split, on its own devices; together they write every image once.
    """
    from tame_jax import cli, data

    fixed = None
    if classes:
        idx = [class_index(c, explainer.class_names) for c in classes]
        fixed = np.tile(np.asarray(idx, np.int32), (explainer.batch_size, 1))
    batches = data.eval_iterator(explainer.config, split=split,
                                 global_batch_size=explainer.batch_size * jax.process_count())
    folder = os.path.join(out_dir, split)
    os.makedirs(folder, exist_ok=True)
    bar = cli.progress_bar(len(batches), f"explain {split}", unit="batch",
                           enabled=show_progress)
    written = 0
    for batch in batches:
        valid = np.flatnonzero(batch["valid"])
        if len(valid):
            crops = batch["image"][valid]
            maps, cls_, probs = explainer.explain_batch(
                crops, None if fixed is None else fixed[:len(valid)], top_k,
                pad_to=explainer.batch_size)
            ex = Explanation(maps, cls_, probs, [], explainer.class_names)
            for i, index in enumerate(batch["index"][valid]):
                path = os.path.join(folder, f"{int(index):06d}.{explainer.method}.png")
                viz.write_panels(path, [viz.overlay(crops[i], h, colormap) for h in maps[i]],
                                 ex.titles(i))
                written += 1
        bar.update()
    bar.close()
    return written


def build_explainer(args: argparse.Namespace) -> Explainer:
    """Returns the explainer the command line asks for (workdir, release or baseline)."""
    from tame_jax import evaluation

    method = evaluation.get_method(args.method)
    weights = args.backbone_weights or None
    if args.workdir:
        return Explainer.from_checkpoint(args.workdir, args.step, backbone_weights=weights,
                                         method=args.method, batch_size=args.batch_size)
    if args.attention:
        if not method.trained:
            raise ValueError(f"--attention is a TAME checkpoint; --method={args.method} needs "
                             "none (drop --attention)")
        return Explainer.from_reference_release(
            args.attention, backbone=args.backbone, backbone_weights=args.backbone_weights,
            batch_size=args.batch_size)
    if method.trained:
        raise ValueError(f"--method={args.method} needs a trained attention module: pass "
                         "--workdir (a training run) or --attention (a released checkpoint), "
                         "or pick a baseline with --method")
    config = _config_file(args.config) if args.config else None
    if config is not None and weights:
        config.model.backbone_weights = weights
    return Explainer.baseline(args.method, backbone=args.backbone or "resnet50",
                              backbone_weights=args.backbone_weights, config=config,
                              num_classes=args.num_classes, image_size=args.image_size,
                              batch_size=args.batch_size)


def _config_file(spec: str) -> Any:
    import runpy

    path, _, arg = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(arg) if arg else get_config()


def parser() -> argparse.ArgumentParser:
    """Returns the command-line parser of `python -m tame_jax.explain`."""
    from tame_jax import evaluation

    p = argparse.ArgumentParser(prog="python -m tame_jax.explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders (recursive) and globs")
    p.add_argument("--images", nargs="+", default=[], help="more inputs (same as positional)")
    p.add_argument("--split", default=None, help="explain every image of this split of the "
                   "data set of --workdir or --config (e.g. test) instead of files, into "
                   "OUT/<split>/<index>.<method>.png; on a multi-host job (SLURM, TPU VM, or "
                   "the config's distributed fields) each host explains its own shard")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workdir", help="a tame_jax.train workdir (its config and checkpoint)")
    src.add_argument("--attention", help="an attention checkpoint of the reference releases "
                     "(.ckpt of T-TAME, .pt/.pth/.npz of TAME)")
    src.add_argument("--config", help="a config file (e.g. configs/demo.py) giving the backbone "
                     "of a baseline")
    p.add_argument("--method", default="tame", help=f"one of {tuple(evaluation.METHODS)}")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--backbone", default=None, help="backbone of --attention or a baseline "
                   "(default: the checkpoint's, else resnet50)")
    p.add_argument("--backbone_weights", default="", help="backbone weights file (overrides "
                   "the workdir's or the checkpoint's)")
    p.add_argument("--num_classes", type=int, default=1000, help="baseline without --config")
    p.add_argument("--image_size", type=int, default=224, help="baseline without --config")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--class", dest="classes", default=None,
                       help="explain these classes (comma-separated indices or names) instead "
                       "of the top prediction")
    which.add_argument("--top_k", type=int, default=1, help="explain the k most probable classes")
    p.add_argument("--out", default="explanations", help="output folder")
    p.add_argument("--batch_size", type=int, default=16, help="images per compiled call")
    p.add_argument("--overlay", choices=("full", "crop", "none"), default="full",
                   help="overlay on the full image (default), on the model's crop, or none")
    p.add_argument("--colormap", default="jet", help="jet (default) or any matplotlib name")
    p.add_argument("--save", choices=("none", "image", "run"), default="none",
                   help="also write maps as .npz: one per image, or one for the run")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--print_config", action="store_true",
                   help="print every config field with its value and meaning, then exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.explain`; returns the exit code."""
    import logging

    from tame_jax import cli, workdirs

    # orbax's notes on opening a checkpoint read-only are not for the user of this command
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.ERROR or "orbax" not in r.pathname)
    args = parser().parse_args(argv)
    if args.print_config:
        if args.workdir:
            config = workdirs.load_config(args.workdir, check=False)
        else:
            config = _config_file(args.config) if args.config else default_config()
        print(cli.config_reference(config), end="")
        return 0
    if args.top_k < 1:
        print("error: --top_k must be at least 1", file=sys.stderr)
        return 2
    if args.split:
        return _main_split(args)
    files, problems = expand_inputs([*args.inputs, *args.images], exclude=args.out)
    if problems or not files:
        for msg in problems or ["no inputs: give image files, folders or globs"]:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    classes = [c for c in args.classes.split(",") if c] if args.classes else None
    planned = [p for _, rel in files
               for p in output_paths(rel, args.out, args.method, args.overlay,
                                     args.save).values()]
    if args.save == "run":
        planned.append(os.path.join(args.out, f"{args.method}_run.npz"))
    existing = [p for p in planned if os.path.exists(p)]
    if existing and not args.overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        print(f"error: {len(existing)} output file(s) exist already ({shown}); nothing was "
              "written. Pass --overwrite to replace them, or another --out.", file=sys.stderr)
        return 2
    try:
        explainer = build_explainer(args)
        if classes:
            for c in classes:
                class_index(c, explainer.class_names)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failures = run_files(explainer, files, args.out, classes=classes, top_k=args.top_k,
                         overlay=args.overlay, save=args.save, colormap=args.colormap)
    done = len(files) - len(failures)
    print(f"explained {done} of {len(files)} images with {args.method} into {args.out}/")
    if failures:
        print(f"{len(failures)} of {len(files)} files could not be read and were skipped:",
              file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def _main_split(args: argparse.Namespace) -> int:
    """`main` with --split: join the multi-host job if there is one, explain the split."""
    from tame_jax import distributed, workdirs

    if args.inputs or args.images:
        print("error: --split explains a data set split: give no image files", file=sys.stderr)
        return 2
    if not (args.workdir or args.config):
        print("error: --split needs the data set of --workdir or --config", file=sys.stderr)
        return 2
    config = (workdirs.load_config(args.workdir, check=False) if args.workdir
              else _config_file(args.config))
    distributed.setup_distributed(config)  # before anything starts JAX's backend
    folder = os.path.join(args.out, args.split)
    # (On several processes a check would race with the others' first files: they overwrite.)
    if (jax.process_count() == 1 and os.path.isdir(folder) and os.listdir(folder)
            and not args.overwrite):
        print(f"error: {folder} holds files already; nothing was written. Pass --overwrite to "
              "replace them, or another --out.", file=sys.stderr)
        return 2
    try:
        explainer = build_explainer(args)
        classes = [c for c in args.classes.split(",") if c] if args.classes else None
        written = run_split(explainer, args.split, args.out, classes=classes, top_k=args.top_k,
                            colormap=args.colormap)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"explained {written} images of split {args.split!r} with {args.method} into "
          f"{folder}/ (process {jax.process_index()} of {jax.process_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
