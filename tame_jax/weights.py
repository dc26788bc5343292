"""Weight import: torchvision / timm backbone state dicts and TAME attention checkpoints.

State dicts are read from `.safetensors` or `.npz` (no torch needed) or `.pth`/`.pt` (needs
torch) and converted into Flax variables of the modules in `tame_jax.backbones`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

_HOW_TO_GET = (
    "Create it once on a machine with internet, e.g.\n"
    "  python -c \"import torchvision, safetensors.torch as st; st.save_file("
    "torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'resnet50.safetensors')\"\n"
    "(see the README section 'Backbone weights'), then point the config at that file."
)


def _to_numpy_dict(obj: Any, path: Path) -> dict[str, np.ndarray]:
    """Returns a flat {name: array} dict from a loaded torch object, unwrapping wrappers."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of names to tensors) but a "
            f"{type(obj).__name__}. Save `model.state_dict()`, not the model."
        )
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu().float().numpy() if value.is_floating_point() \
                else value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray | np.generic | int | float):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                "the file is not a plain state dict."
            )
        out[str(key)] = np.asarray(value)
    return out


def _read_pth(path: Path) -> Any:
    """Returns the object torch.load finds in a .pth/.pt file (weights only)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs PyTorch: `pip install -e \".[torch]\"`, or convert the file "
            "once to .safetensors (safetensors.torch.save_file(state_dict, 'model.safetensors')) "
            "on a machine that has torch."
        ) from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / weights_only errors
        raise ValueError(
            f"Could not read weights file {path} with torch.load(weights_only=True): "
            f"{type(e).__name__}: {e}"
        ) from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns the {name: numpy array} state dict stored in a .safetensors/.npz/.pth/.pt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file not found: {path}. {_HOW_TO_GET}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz", ".pth", ".pt"):
        raise ValueError(
            f"Unknown weights file extension {suffix!r} for {path}; expected .safetensors, "
            ".npz, .pth or .pt."
        )
    if suffix in (".pth", ".pt"):
        obj = _read_pth(path)  # ImportError without torch
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # safetensors / zipfile / numpy raise various types
        raise ValueError(
            f"Could not read weights file {path} as {suffix}: {type(e).__name__}: {e}"
        ) from e
    return _to_numpy_dict(obj, path)


# --- torchvision / timm backbones ---

# (collection, Flax leaf) -> torchvision parameter name.
_TV_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_TIMM_VGG_RENAMES = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.",
                     "head.fc.": "classifier.6."}


def _tv_module(path: tuple[str, ...]) -> str:
    """Returns the torchvision module path of a Flax path: (layer1_0, conv1) -> layer1.0.conv1."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Returns the torch shape of a Flax leaf: HWIO conv -> OIHW, (in, out) linear -> (out, in)."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a timm VGG state dict (pre_logits.fc1/fc2 convs, head.fc) in torchvision naming."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _TIMM_VGG_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                if key.endswith(".weight") and np.ndim(value) == 4:  # conv -> linear weight
                    value = np.reshape(value, (value.shape[0], -1))
        out[key] = value
    return out


def torchvision_to_flax(
    backbone_name: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns variables {'params', 'batch_stats'} like `template`, filled from a state dict.

    state_dict: torchvision naming (timm's `resnet*.tv_in1k` has the same keys; timm's VGG
    naming `pre_logits.fc1/fc2`, `head.fc` is detected and converted). template: the module's
    variables or their shapes (`init_backbone` or `jax.eval_shape`). Conv OIHW -> HWIO, linear
    (out, in) -> (in, out); `num_batches_tracked` is ignored. Raises ValueError naming every
    missing key, unexpected key and shape mismatch.
    """
    if any(k.startswith(("pre_logits.", "head.fc.")) for k in state_dict):
        state_dict = _from_timm(state_dict)
    given = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    out: dict[str, Any] = {"params": {}, "batch_stats": {}}
    used: set[str] = set()
    missing, mismatched = [], []
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(template.get(collection, {})))
        converted = {}
        for path, spec in flat.items():
            key = f"{_tv_module(path[:-1])}.{_TV_LEAF_NAMES[(collection, path[-1])]}"
            want = _torch_shape(path[-1], tuple(spec.shape))
            if key not in given:
                missing.append(f"{key} {want}")
                continue
            used.add(key)
            value = np.asarray(given[key])
            if value.shape != want:
                mismatched.append(f"{key}: file has {value.shape}, model expects {want}")
                continue
            if path[-1] == "kernel":
                value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
            converted[path] = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))
        out[collection] = traverse_util.unflatten_dict(converted) if converted else {}
    unexpected = sorted(set(given) - used)
    if missing or unexpected or mismatched:
        lines = [f"The state dict does not fit backbone {backbone_name!r}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        lines.append("Check the backbone name (e.g. vgg16 vs vgg16_bn, resnet50 vs resnet101) "
                     "and num_classes against the file.")
        raise ValueError("\n".join(lines))
    return out


def load_backbone_weights(
    backbone_name: str, path: str | os.PathLike, template: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns backbone variables like `template`, read from a torchvision/timm weights file."""
    return torchvision_to_flax(backbone_name, load_state_dict(path), template)


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the torchvision-layout state dict of backbone variables (inverse of the import)."""
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path, value in flat.items():
            key = f"{_tv_module(path[:-1])}.{_TV_LEAF_NAMES[(collection, path[-1])]}"
            value = np.asarray(value)
            if path[-1] == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            out[key] = np.ascontiguousarray(value)
    return out


# --- TAME attention checkpoints of the reference release (owned by the attention helper) ---

# Reference key layout: convs.{i}.weight (O, I, 1, 1) | bias, bns.{i}.weight | bias |
# running_mean | running_var | num_batches_tracked, fuser.weight (K, C, 1, 1) | bias.
_TAME_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_TAME_OPTIONAL_SUFFIX = ".num_batches_tracked"


def _tame_torch_module(module: str) -> str:
    """Returns the reference module name of a Flax submodule: convs_0 -> convs.0, fuser -> fuser."""
    for stem in ("convs", "bns"):
        if module.startswith(stem + "_"):
            return f"{stem}.{module[len(stem) + 1:]}"
    return module


def _tame_torch_key(collection: str, module: str, leaf: str) -> str:
    """Returns the reference key of a Flax leaf, e.g. params/convs_0/kernel -> convs.0.weight."""
    return f"{_tame_torch_module(module)}.{_TAME_LEAF_NAMES[(collection, leaf)]}"


def _tame_key_prefix(keys: Mapping[str, Any]) -> str:
    """Returns the prefix in front of `fuser.weight` (e.g. 'attn_mech.'), '' when there is none."""
    if "fuser.weight" in keys:
        return ""
    found = sorted(k[: -len("fuser.weight")] for k in keys if k.endswith(".fuser.weight"))
    return found[0] if len(found) == 1 else ""


def tame_variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], template: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns Flax variables {'params', ['batch_stats']} of TAMEAttention from a reference dict.

    template: the variables (or their shapes, e.g. `jax.eval_shape(model.init, key, features)`)
    of the TAMEAttention to fill; it fixes the expected keys and shapes. Convolution weights
    are OIHW in the state dict and HWIO in Flax. `num_batches_tracked` is accepted and ignored.
    When every key carries one prefix in front of `fuser.weight` (e.g. `attn_mech.` from a
    whole-model state dict), that prefix is stripped and keys without it are ignored.
    Raises ValueError naming every missing key, unexpected key and shape mismatch.
    """
    prefix = _tame_key_prefix(state_dict)
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out: dict[str, Any] = {}
    expected: set[str] = set()
    missing, mismatched = [], []
    for collection in ("params", "batch_stats"):
        for module, leaves in template.get(collection, {}).items():
            for leaf, spec in leaves.items():
                key = _tame_torch_key(collection, module, leaf)
                expected.add(key)
                want = tuple(spec.shape)
                torch_shape = (want[3], want[2], want[0], want[1]) if leaf == "kernel" else want
                if key not in given:
                    missing.append(f"{prefix}{key} {torch_shape}")
                    continue
                value = np.asarray(given[key])
                if value.shape != torch_shape:
                    mismatched.append(
                        f"{prefix}{key}: file has {value.shape}, model expects {torch_shape}"
                    )
                    continue
                if leaf == "kernel":
                    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
                out.setdefault(collection, {}).setdefault(module, {})[leaf] = value.astype(
                    np.dtype(spec.dtype)
                )
    unexpected = sorted(
        prefix + k
        for k in given
        if k not in expected
        and not (
            k.endswith(_TAME_OPTIONAL_SUFFIX)
            and k[: -len(_TAME_OPTIONAL_SUFFIX)] + ".running_mean" in expected
        )
    )
    if missing or unexpected or mismatched:
        lines = ["The TAME attention checkpoint does not fit the attention module:"]
        if missing:
            lines.append("  missing keys: " + ", ".join(missing))
        if unexpected:
            lines.append("  unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        lines.append(
            "Check that the variant, the backbone layers (their order and channels) and the "
            "number of classes match the ones the checkpoint was trained with."
        )
        raise ValueError("\n".join(lines))
    return out


def tame_state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the reference-layout state dict {key: array} (OIHW kernels) of TAMEAttention vars."""
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for module, leaves in variables.get(collection, {}).items():
            for leaf, value in leaves.items():
                value = np.asarray(value)
                if leaf == "kernel":
                    value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
                out[_tame_torch_key(collection, module, leaf)] = value
            if collection == "batch_stats":
                out[_tame_torch_module(module) + _TAME_OPTIONAL_SUFFIX] = np.asarray(0, np.int64)
    return out


def load_tame_checkpoint(path: str | os.PathLike, template: Mapping[str, Any]) -> dict[str, Any]:
    """Returns TAMEAttention variables read from a reference .pt/.pth (torch) or .npz checkpoint.

    template: variables or shapes of the target module (see tame_variables_from_state_dict).
    """
    return tame_variables_from_state_dict(load_state_dict(path), template)
