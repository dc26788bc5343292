"""Weight import: torchvision / timm backbone state dicts and TAME attention checkpoints.

State dicts are read from `.safetensors` or `.npz` (no torch needed) or `.pth`/`.pt` (needs
torch) and converted into Flax variables of the modules in `tame_jax.backbones`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

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


# --- TAME attention checkpoints of the reference release (owned by the attention helper) ---
