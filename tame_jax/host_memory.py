"""CPU runs keep the memory malloc frees, instead of handing it back to the kernel each step.

Why: XLA's CPU runtime allocates each call's temporaries as one block (620 MB for the
ResNet-50 train step at batch 8). glibc's malloc serves any block over 32 MiB with a fresh
`mmap` and unmaps it on `free`, so every step faults its temporaries in again, page by page,
each page zeroed by the kernel: 187-193 k minor faults and 0.27-0.32 s of kernel time per
0.92-0.96 s step on 2 cores, the first pass over each buffer at a third of its speed. (Eager
PyTorch allocates tensor by tensor: only its tensors over 32 MiB are hit, e.g. VGG-16's
first activations.) With one malloc arena, no mmap for large blocks, no trimming, and
transparent huge pages for the heap, the step faults nothing after its first call (README,
"Host memory").

glibc reads these settings once, when the process starts, and a setting made later
(`mallopt`) misses the arenas of threads already started. So `python -m tame_jax.<command>`
re-executes itself once, at the import of the package, with them in its environment: same
PID, same arguments, before anything else is imported. It does so only where it helps and
is safe: Linux with glibc, a JAX process on the CPU (no accelerator plugin installed, or
JAX_PLATFORMS=cpu), and an environment that sets none of them. `TAME_JAX_MALLOC=system`
keeps glibc's defaults; the re-executed process has `TAME_JAX_MALLOC=keep`.
"""

from __future__ import annotations

import os
import platform
import sys

ENV = "TAME_JAX_MALLOC"  # 'keep': set by the re-execution; 'system': leave glibc's defaults
GLIBC_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # one heap: large blocks in other arenas are always mmap'ed
    "MALLOC_MMAP_MAX_": "0",  # large blocks from the heap, reused after free
    "MALLOC_TRIM_THRESHOLD_": str(2**62),  # never shrink the heap
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",  # madvise(MADV_HUGEPAGE) on the heap (2.35+)
}


def _runs_on_cpu(environ: dict[str, str]) -> bool:
    """Returns whether JAX will run on the CPU, without starting it: JAX_PLATFORMS=cpu, or no
    accelerator plugin (CUDA, ROCm, TPU) installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms == "cpu"
    import importlib.metadata
    import importlib.util

    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("libtpu") is None


def _module_of(orig_argv: list[str]) -> str:
    """Returns MODULE of a `python [options] -m MODULE ...` command line, else ''."""
    for i, arg in enumerate(orig_argv[1:], 1):
        if arg == "-m":
            return orig_argv[i + 1] if i + 1 < len(orig_argv) else ""
        if arg.startswith("-m"):
            return arg[2:]
    return ""


def relaunch_args(argv: list[str], orig_argv: list[str], environ: dict[str, str],
                  system: str, libc: str) -> list[str] | None:
    """Returns the command to re-execute with GLIBC_SETTINGS, or None where it doesn't apply.

    argv, orig_argv: sys.argv and sys.orig_argv while the package is imported; argv[0] is
    '-m' while `python -m MODULE` locates MODULE (so a `python -m tame_jax.X` that is
    already running, or a test importing tame_jax, never re-executes).
    """
    if system != "Linux" or libc != "glibc" or ENV in environ:
        return None
    if any(k in environ for k in GLIBC_SETTINGS):
        return None  # the user's allocator settings stand
    if argv[:1] != ["-m"] or _module_of(orig_argv).split(".")[0] != "tame_jax":
        return None
    if not _runs_on_cpu(environ):
        return None
    return [sys.executable, *orig_argv[1:]]


def _libc() -> str:
    """Returns 'glibc' where the C library is glibc (cheaply: no scan of the executable)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").split(" ")[0]
    except (ValueError, OSError, AttributeError):
        return ""


def relaunch_if_cpu_entry_point() -> None:
    """Re-executes `python -m tame_jax.X ...` with GLIBC_SETTINGS where `relaunch_args` says
    so; returns without doing anything otherwise (or if the exec fails)."""
    args = relaunch_args(sys.argv, getattr(sys, "orig_argv", []), dict(os.environ),
                         platform.system(), _libc())
    if args is None:
        return
    env = {**os.environ, **GLIBC_SETTINGS, ENV: "keep"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, args, env)
    except OSError:
        return


def describe() -> str:
    """Returns the allocator settings in force, for benchmark records."""
    if all(os.environ.get(k) == v for k, v in GLIBC_SETTINGS.items()):
        return "glibc malloc keeps freed memory (tame_jax.host_memory)"
    own = [f"{k}={os.environ[k]}" for k in GLIBC_SETTINGS if k in os.environ]
    if own:
        return "the environment's: " + " ".join(own)
    return "system default" + (f" ({ENV}={os.environ[ENV]})" if ENV in os.environ else "")


def faults_per_reuse(megabytes: int = 256, repeats: int = 3) -> float:
    """Returns the minor page faults per malloc of a `megabytes` block like one that was just
    written and freed (as XLA's CPU runtime does each call): about none where freed memory is
    kept, one per page where it went back to the kernel. Linux with glibc only."""
    import ctypes
    import resource

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = megabytes << 20

    def write_block() -> None:
        ptr = libc.malloc(size)
        if not ptr:
            raise MemoryError(f"malloc({size}) failed")
        ctypes.memset(ptr, 1, size)
        libc.free(ptr)

    write_block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        write_block()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats
