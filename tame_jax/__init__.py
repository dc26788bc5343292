"""tame_jax: TAME (Trainable Attention Mechanism for Explanations) in JAX/Flax.

`from tame_jax import Explainer, overlay` gives the explanation API; the names are imported on
first use, so `import tame_jax` stays light (no JAX, no TensorFlow).
"""

from __future__ import annotations

from typing import Any

from tame_jax import host_memory as _host_memory

_host_memory.relaunch_if_cpu_entry_point()  # `python -m tame_jax.X` on a CPU: see host_memory

__version__ = "0.1.0"

_LAZY = {"Explainer": "tame_jax.explain", "Explanation": "tame_jax.explain",
         "overlay": "tame_jax.viz"}
__all__ = ["Explainer", "Explanation", "overlay", "__version__"]


def __getattr__(name: str) -> Any:
    """Returns the public names of the API, importing their module on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tame_jax' has no attribute {name!r}")
