"""Timing helpers for benchmarks: paired timings against a peak matmul, FLOPs and memory of
compiled programs, and the machine's description."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tame_jax import host_memory

WARMUP = 2  # untimed calls after compilation


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = WARMUP) -> float:
    """Returns the median wall time in seconds of `steps` calls of fn (after `warmup` calls).

    fn must return something `jax.block_until_ready` can wait on.
    """
    return time_paired(fn, None, steps, warmup)[0]


def time_paired(fn: Callable[[], Any], reference: Callable[[], Any] | None, steps: int,
                warmup: int = WARMUP) -> tuple[float, float]:
    """Returns (median seconds of fn, median over calls of t_reference / t_fn).

    After each timed call of fn, one call of `reference` (the peak matmul) is timed, so that
    both see the same machine load; the ratio is NaN without a reference.
    """
    seconds, ratio, _ = time_paired_cpu(fn, reference, steps, warmup)
    return seconds, ratio


def time_paired_cpu(fn: Callable[[], Any], reference: Callable[[], Any] | None, steps: int,
                    warmup: int = WARMUP) -> tuple[float, float, float]:
    """Returns `time_paired`'s two values plus the median ratio of process CPU times.

    The CPU-time ratio (reference / fn) counts only the cycles this process got, so on a CPU
    shared with other jobs it is the steadier measure of efficiency.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    if reference is not None:
        jax.block_until_ready(reference())
    times, ratios, cpu_ratios = [], [], []
    for _ in range(max(1, steps)):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        if reference is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(reference())
            ratios.append((time.perf_counter() - t0) / times[-1])
            cpu_ratios.append((time.process_time() - c0) / max(cpu, 1e-9))
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    return statistics.median(times), med(ratios), med(cpu_ratios)


def compiled_flops(compiled: Any) -> float:
    """Returns the 'flops' entry of a compiled executable's XLA cost analysis (0 if absent)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per partition
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compiled_memory_bytes(compiled: Any) -> int:
    """Returns argument + output + temp bytes of a compiled executable (aliased bytes once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return 0
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return int(total - getattr(mem, "alias_size_in_bytes", 0))


def device_peak_bytes(device: jax.Device) -> int | None:
    """Returns the device's peak_bytes_in_use since start (GPU/TPU), or None where unreported."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise instead of returning None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


@dataclasses.dataclass
class PeakMatmul:
    """An n x n x n jnp.dot in the benchmark's dtype on the benchmark's device: the peak.

    Calling it runs one product (2 n^3 FLOPs). It is timed right after every timed call of a
    workload, so that utilisation compares the two under the same machine load (the CPU here
    may be shared); `flops_per_s` keeps every timing of it.
    """

    dtype: Any
    n: int
    fn: Callable[[], jax.Array]
    timings: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def create(cls, dtype: Any, n: int | None = None,
               device: jax.Device | None = None) -> PeakMatmul:
        """Returns the product for dtype; n defaults to 2048 on CPU and 8192 elsewhere."""
        device = device or jax.devices()[0]
        if n is None:
            n = 2048 if device.platform == "cpu" else 8192
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
        b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
        dot = jax.jit(jnp.dot)
        return cls(dtype=dtype, n=n, fn=lambda: dot(a, b))

    @property
    def flops(self) -> float:
        """Returns the FLOPs of one product, 2 n^3."""
        return 2.0 * self.n**3

    def __call__(self) -> jax.Array:
        """Returns one product, timing it (blocking) into `timings`."""
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.fn())
        self.timings.append(time.perf_counter() - t0)
        return out

    def flops_per_s(self) -> float:
        """Returns the median FLOP/s over all timed products so far (the reported peak)."""
        return self.flops / statistics.median(self.timings)


def conv_probe(peak: PeakMatmul, batch: int, steps: int = 5, spatial: int = 14,
               channels: int = 256, device: jax.Device | None = None) -> dict[str, float]:
    """Returns {'gflops', 'seconds', 'flop_utilisation'} of one 3x3 NHWC convolution alone.

    Default shape: ResNet-50's layer3 3x3 conv, (batch, 14, 14, 256) -> 256 channels.
    """
    device = device or jax.devices()[0]
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, spatial, spatial, channels), jnp.float32)
    w = jax.random.normal(kw, (3, 3, channels, channels), jnp.float32)
    x = jax.device_put(x.astype(peak.dtype), device)
    w = jax.device_put(w.astype(peak.dtype), device)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    flops = 2.0 * batch * spatial * spatial * 9 * channels * channels
    seconds, ratio, cpu_ratio = time_paired_cpu(lambda: conv(x, w), peak, steps)
    return {"gflops": flops / 1e9, "seconds": seconds,
            "flop_utilisation": flops / peak.flops * ratio,
            "flop_utilisation_cpu_time": flops / peak.flops * cpu_ratio}


def machine_info() -> dict[str, Any]:
    """Returns a description of the machine: platform, devices, CPU count, load, XLA flags,
    the host allocator's settings."""
    device = jax.devices()[0]
    info = {
        "jax": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_malloc": host_memory.describe(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = list(os.getloadavg())
    return info
