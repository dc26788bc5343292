"""Weight import: torchvision / timm backbone state dicts and TAME attention checkpoints.

State dicts are read from `.safetensors` or `.npz` (no torch needed) or `.pth`/`.pt` (needs
torch) and converted into Flax variables of the modules in `tame_jax.backbones`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
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


# --- conversion into Flax variables ---

# (collection, Flax leaf) -> PyTorch parameter name, for every module family and the TAME
# attention module alike.
LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIX = ".num_batches_tracked"  # PyTorch BatchNorm's counter: no Flax counterpart

KeyOf = Callable[[str, tuple[str, ...]], str]


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Returns the torch shape of a Flax leaf: HWIO conv -> OIHW, (in, out) linear -> (out, in)."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    """Returns a torch tensor in Flax layout (OIHW -> HWIO, (out, in) -> (in, out))."""
    if leaf == "kernel":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    """Returns a Flax leaf in torch layout (the inverse of `_to_flax`)."""
    if leaf == "kernel":
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def convert_state_dict(state_dict: Mapping[str, Any], template: Mapping[str, Any],
                       key_of: KeyOf, *, title: str, hint: str,
                       layouts: Mapping[str, Callable] | None = None) -> dict[str, Any]:
    """Returns variables like `template` ({'params', 'batch_stats'}) filled from a state dict.

    key_of(collection, flax path) names the state-dict entry of each template leaf; `layouts`
    may map such names to a function turning the stored tensor into the Flax layout (default:
    OIHW -> HWIO kernels, (out, in) -> (in, out) linear weights). `num_batches_tracked` entries
    are ignored. Raises ValueError titled `title`, naming every missing key, unexpected key and
    shape mismatch, and ending with `hint`.
    """
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    layouts = layouts or {}
    out: dict[str, Any] = {}
    used: set[str] = set()
    missing, mismatched = [], []
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(template.get(collection, {}) or {}))
        converted = {}
        for path, spec in flat.items():
            key = key_of(collection, path)
            if key not in given:
                want = torch_shape(path[-1], tuple(spec.shape))
                missing.append(f"{key} {want}")
                continue
            used.add(key)
            value = np.asarray(given[key])
            to_flax = layouts.get(key, lambda v, leaf=path[-1]: _to_flax(leaf, v))
            if key not in layouts and value.shape != torch_shape(path[-1], tuple(spec.shape)):
                mismatched.append(f"{key}: file has {value.shape}, model expects "
                                  f"{torch_shape(path[-1], tuple(spec.shape))}")
                continue
            value = to_flax(value)
            if value.shape != tuple(spec.shape):
                mismatched.append(f"{key}: file has {np.shape(given[key])}, model expects "
                                  f"{tuple(spec.shape)} (after conversion)")
                continue
            converted[path] = np.ascontiguousarray(value, dtype=np.dtype(spec.dtype))
        if converted:
            out[collection] = traverse_util.unflatten_dict(converted)
        elif collection == "params" or collection in template:
            out[collection] = {}
    unexpected = sorted(set(given) - used)
    if missing or unexpected or mismatched:
        lines = [title]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched))
        lines.append(hint)
        raise ValueError("\n".join(lines))
    return out


def export_state_dict(variables: Mapping[str, Any], key_of: KeyOf) -> dict[str, np.ndarray]:
    """Returns the torch-layout state dict of Flax variables (the inverse of the import)."""
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {}) or {}))
        for path, value in flat.items():
            out[key_of(collection, path)] = np.ascontiguousarray(
                _to_torch(path[-1], np.asarray(value)))
    return out


# --- torchvision / timm backbones ---


def torchvision_key(collection: str, path: tuple[str, ...]) -> str:
    """Returns the torchvision name of a Flax leaf: params/layer1_0/conv1/kernel ->
    layer1.0.conv1.weight (a trailing `_<n>` of a module name becomes `.<n>`)."""
    module = ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in path[:-1])
    return f"{module}.{LEAF_NAMES[(collection, path[-1])]}"


def torchvision_to_flax(
    backbone_name: str, state_dict: Mapping[str, Any], template: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns variables {'params', 'batch_stats'} like `template`, from a torchvision state dict.

    template: the module's variables or their shapes (`init_backbone` or `jax.eval_shape`).
    Conv OIHW -> HWIO, linear (out, in) -> (in, out); `num_batches_tracked` is ignored. Raises
    ValueError naming every missing key, unexpected key and shape mismatch.
    """
    return convert_state_dict(
        state_dict, template, torchvision_key,
        title=f"The state dict does not fit backbone {backbone_name!r}:",
        hint="Check the backbone name (e.g. vgg16 vs vgg16_bn, resnet50 vs resnet101) and "
             "num_classes against the file.")


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the torchvision-layout state dict of backbone variables (inverse of the import)."""
    return export_state_dict(variables, torchvision_key)


def load_backbone_weights(
    backbone_name: str, path: str | os.PathLike, template: Mapping[str, Any]
) -> dict[str, Any]:
    """Returns backbone variables like `template`, read from a weights file by the backbone's
    registered converter (torchvision/timm naming for the ResNets and VGGs)."""
    from tame_jax.backbones import get_spec

    return get_spec(backbone_name).convert(load_state_dict(path), template)


# --- TAME attention checkpoints of the reference release ---


def tame_reference_key(collection: str, path: tuple[str, ...]) -> str:
    """Returns the reference key of a Flax leaf, e.g. params/convs_0/kernel -> convs.0.weight."""
    module = path[0]
    for stem in ("convs", "bns"):
        if module.startswith(stem + "_"):
            module = f"{stem}.{module[len(stem) + 1:]}"
    return f"{module}.{LEAF_NAMES[(collection, path[-1])]}"


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
    given = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    variables = convert_state_dict(
        given, template, lambda c, p: prefix + tame_reference_key(c, p),
        title="The TAME attention checkpoint does not fit the attention module:",
        hint="Check that the variant, the backbone layers (their order and channels) and the "
             "number of classes match the ones the checkpoint was trained with.")
    return {k: v for k, v in variables.items() if v or k == "params"}


def tame_state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Returns the reference-layout state dict {key: array} (OIHW kernels) of TAMEAttention vars."""
    out = export_state_dict(variables, tame_reference_key)
    for module in variables.get("batch_stats", {}):
        out[tame_reference_key("batch_stats", (module, "mean")).rsplit(".", 1)[0]
            + _IGNORED_SUFFIX] = np.asarray(0, np.int64)
    return out


def load_tame_checkpoint(path: str | os.PathLike, template: Mapping[str, Any]) -> dict[str, Any]:
    """Returns TAMEAttention variables read from a reference .pt/.pth (torch) or .npz checkpoint.

    template: variables or shapes of the target module (see tame_variables_from_state_dict).
    """
    return tame_variables_from_state_dict(load_state_dict(path), template)


# --- the T-TAME release: PyTorch Lightning checkpoints (.ckpt) ---

# Where a T-TAME `state_dict` keeps each part: the attention module (CNNs; for ViT it is the
# second entry of a Sequential whose first, a token-to-map reshape, has no weights) and the
# backbone's feature extractor (stored twice; the first copy is read).
LIGHTNING_ATTENTION_PREFIXES = ("generic.attn_mech.1.", "generic.attn_mech.")
LIGHTNING_BACKBONE_PREFIXES = ("generic.body.", "generic.arrangement.body.")


def read_lightning_checkpoint(path: str | os.PathLike
                              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Returns (state dict as numpy, hyper_parameters) of a PyTorch Lightning .ckpt file.

    Read with torch.load(weights_only=True): nothing in the file is executed. Lightning's other
    entries (epoch, global_step, optimizer_states, lr_schedulers, loops, callbacks) are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading the Lightning checkpoint {path} needs PyTorch: `pip install -e \".[torch]\"`"
            ", or convert it once where torch is installed: python -c \"import torch, numpy as "
            f"np; sd = torch.load('{path}', weights_only=True)['state_dict']; np.savez('"
            f"{path.with_suffix('.npz')}', **{{k: v.float().numpy() for k, v in sd.items()}})\""
            " (the .npz loads without torch)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects outside the allow-list
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
        why = next((line for line in lines if "Unsupported global" in line),
                   lines[0] if lines else "")
        raise ValueError(
            f"torch.load(weights_only=True) refused {path}: {type(e).__name__}: {why}\n"
            "The file holds Python objects besides "
            "tensors (e.g. in hyper_parameters or lr_schedulers). Only if you trust its source, "
            "extract the weights once: python -c \"import torch; torch.save(torch.load("
            f"'{path}', weights_only=False)['state_dict'], '{path.with_suffix('.pt')}')\" and "
            "pass the .pt file instead.") from e
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry "
                         f"(found {sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj)})")
    hyper = obj.get("hyper_parameters") or {}
    return _to_numpy_dict(obj["state_dict"], path), dict(hyper) if isinstance(
        hyper, Mapping) else {}


def split_reference_state_dict(state_dict: Mapping[str, np.ndarray]
                               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Returns (attention entries, backbone entries) of a T-TAME whole-model state dict, each
    with its prefix removed; a plain attention state dict comes back whole, backbone empty."""
    def strip(prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
        for prefix in prefixes:
            part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if part:  # the ViT form (attn_mech.1.) is tried first
                return part
        return {}

    attention = strip(LIGHTNING_ATTENTION_PREFIXES)
    if not attention:
        return dict(state_dict), {}
    return attention, strip(LIGHTNING_BACKBONE_PREFIXES)


def load_reference_release(path: str | os.PathLike
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Returns (attention state dict, backbone state dict (may be empty), hyper_parameters) of a
    reference attention checkpoint: a T-TAME Lightning .ckpt, a TAME .pt/.pth, or an .npz with
    either form's keys."""
    suffix = Path(path).suffix.lower()
    if suffix == ".ckpt":
        state_dict, hyper = read_lightning_checkpoint(path)
    else:
        state_dict, hyper = load_state_dict(path), {}
    attention, backbone = split_reference_state_dict(state_dict)
    return attention, backbone, hyper
