"""Portable workdirs: paths that may be URLs (gs://), the config a training run saves, and
where its backbone weights are now.

`train` writes WORKDIR/config.json with the backbone weights recorded three ways: the
absolute path, the path relative to the workdir, and the file's SHA-256. `explain` and
`evaluate` read it back with `load_config`, which finds the weights at the recorded path, else
relative to the workdir where it is now (a project folder moved or copied elsewhere), else
takes `backbone_weights=` from the command line; a file whose hash differs from the recorded
one gets a warning (the maps would not be those of the trained checkpoint).

Local paths use `os`; URLs go through `etils.epath` (TensorFlow's gfile for gs://, as orbax
does), imported only when a URL is met.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from typing import IO, Any

import ml_collections

CONFIG_FILE = "config.json"


def is_url(path: str | os.PathLike) -> bool:
    """Returns whether path names a remote file system (gs://, s3://, ...)."""
    return "://" in os.fspath(path)


def _epath(path: str) -> Any:
    from etils import epath

    return epath.Path(path)


def absolute(path: str | os.PathLike) -> str:
    """Returns path made absolute (~ expanded); URLs unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Returns os.path.join for local paths, a '/'-joined URL for remote ones."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    """Returns whether the file or folder exists (local or URL)."""
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    """Returns whether path is an existing file (local or URL)."""
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def makedirs(path: str) -> None:
    """Creates the folder and its parents (local or URL)."""
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO[Any]:
    """Returns the open file (local or URL)."""
    path = os.fspath(path)
    return _epath(path).open(mode) if is_url(path) else open(path, mode)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """Returns the SHA-256 of a file's content (hex); cached per path, size and mtime."""
    if is_url(path):
        return _sha256(path, -1, -1)
    st = os.stat(path)
    return _sha256(path, st.st_size, st.st_mtime_ns)


def record_backbone_weights(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Records config.model.backbone_weights (an unlocked config) as an absolute path, relative
    to the workdir and by content hash, in place (what `train` saves in config.json)."""
    path = config.model.backbone_weights
    if not path or path == "random":
        return
    path = absolute(path)
    relative = ""
    if not is_url(path) and not is_url(workdir):
        try:
            relative = os.path.relpath(path, absolute(workdir))
        except ValueError:  # another drive (Windows)
            relative = ""
    config.model.backbone_weights = path
    config.model.backbone_weights_relative = relative
    config.model.backbone_weights_sha256 = file_sha256(path) if is_file(path) else ""


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes WORKDIR/config.json (the backbone weights recorded by path and hash)."""
    config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked
    record_backbone_weights(config, workdir)
    with open_file(join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def _merge(base: ml_collections.ConfigDict, loaded: dict[str, Any]) -> None:
    """Sets base's fields from loaded (JSON lists back to tuples where base has tuples)."""
    for key, value in loaded.items():
        if isinstance(value, dict) and key in base and isinstance(
                base[key], ml_collections.ConfigDict) and key != "backbone_kwargs":
            _merge(base[key], value)
        elif key in base and isinstance(base[key], tuple) and isinstance(value, list):
            base[key] = tuple(value)
        elif key in base and isinstance(base[key], ml_collections.ConfigDict):
            base[key] = ml_collections.ConfigDict(value)
        else:
            base[key] = value


def load_config(workdir: str, *, backbone_weights: str | None = None,
                check: bool = True) -> ml_collections.ConfigDict:
    """Returns the config saved in WORKDIR/config.json on top of today's defaults, with
    model.backbone_weights pointing at a file that exists (see `resolve_backbone_weights`)."""
    from tame_jax.config import default_config

    path = join(workdir, CONFIG_FILE)
    if not is_file(path):
        raise FileNotFoundError(
            f"{path} not found: is {workdir} a tame_jax.train workdir? (train writes "
            "config.json when it starts)")
    with open_file(path) as f:
        loaded = json.load(f)
    config = default_config()
    _merge(config, loaded)
    if check:
        resolve_backbone_weights(config, workdir, backbone_weights)
    elif backbone_weights:
        config.model.backbone_weights = backbone_weights
    return config


def resolve_backbone_weights(config: ml_collections.ConfigDict, workdir: str,
                             override: str | None = None) -> str:
    """Returns the backbone weights file a workdir's config should use now, and sets it.

    override (--backbone_weights) wins; else the recorded absolute path, else the recorded
    path relative to where the workdir is now, else a relative path read against the workdir.
    FileNotFoundError naming every place looked at when none exists; a warning when the
    file's SHA-256 differs from the one recorded at training time.
    """
    recorded = config.model.backbone_weights
    expected = config.model.get("backbone_weights_sha256", "") or ""
    if override:
        path = absolute(override)
        if not is_file(path):
            raise FileNotFoundError(f"--backbone_weights={override}: no such file")
    elif not recorded or recorded == "random":
        return recorded
    else:
        candidates = [absolute(recorded) if not os.path.isabs(recorded) else recorded]
        relative = config.model.get("backbone_weights_relative", "") or ""
        if relative:
            candidates.append(os.path.normpath(join(absolute(workdir), relative)))
        if not os.path.isabs(recorded) and not is_url(recorded):
            candidates.append(os.path.normpath(join(absolute(workdir), recorded)))
        found = [c for c in dict.fromkeys(candidates) if is_file(c)]
        if not found:
            hint = f" (SHA-256 {expected})" if expected else ""
            raise FileNotFoundError(
                f"the backbone weights of {workdir} are not where its config.json says; "
                f"looked at: {', '.join(dict.fromkeys(candidates))}. Pass "
                f"--backbone_weights=PATH to the file it was trained with{hint}.")
        path = found[0]
    if expected and file_sha256(path) != expected:
        warnings.warn(
            f"backbone weights {path} have SHA-256 {file_sha256(path)[:16]}..., but {workdir} "
            f"was trained with {expected[:16]}...: the explanations will not be those of the "
            "trained attention. Pass --backbone_weights with the file it was trained with.",
            UserWarning, stacklevel=2)
    config.model.backbone_weights = path
    return path


def get_config(workdir: str) -> ml_collections.ConfigDict:
    """Returns WORKDIR/config.json as a config (the default --config of evaluate)."""
    return load_config(workdir, check=False)
