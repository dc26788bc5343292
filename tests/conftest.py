"""Test set-up: 8 fake CPU devices (set before JAX starts) so the sharded step can be tested."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torchvision's C extensions crash the process (segfault in triton) when loaded after
# TensorFlow; where the optional torch stack is installed, load it first.
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass
