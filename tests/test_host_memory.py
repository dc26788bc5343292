"""`python -m tame_jax.X` on a CPU keeps the memory malloc frees (`tame_jax.host_memory`): it
re-executes itself once with glibc's settings, same PID and arguments, and then re-allocating
a freed block faults no pages, where glibc's defaults fault every page again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tame_jax import host_memory

ON_GLIBC = platform.system() == "Linux" and host_memory._libc() == "glibc"


def _run_probe(**env: str) -> tuple[int, str, float]:
    """Returns (child PID, allocator description, faults per reuse) of the probe command."""
    base = {k: v for k, v in os.environ.items()
            if k != host_memory.ENV and k not in host_memory.GLIBC_SETTINGS}
    proc = subprocess.Popen([sys.executable, "-m", "tame_jax.tools.host_malloc"],
                            env={**base, "JAX_PLATFORMS": "cpu", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    first, second = out.strip().splitlines()[-2:]
    pid = int(first.split(";")[0].split()[1])
    assert pid == proc.pid  # re-executed in place, not a child process
    return pid, first.split("host malloc: ")[1], float(second.rsplit(":", 1)[1])


@pytest.mark.skipif(not ON_GLIBC, reason="the settings are glibc's (Linux)")
def test_cpu_entry_point_keeps_freed_memory_and_system_setting_does_not():
    _, kept, faults_kept = _run_probe()
    assert kept.startswith("glibc malloc keeps freed memory")
    _, system, faults_system = _run_probe(TAME_JAX_MALLOC="system")
    assert system.startswith("system default")
    pages = 256 * 2**20 / os.sysconf("SC_PAGE_SIZE")
    assert faults_system > 0.9 * pages  # glibc's default: every page faulted again
    assert faults_kept < 0.01 * pages


@pytest.mark.parametrize("argv, orig_argv, environ, expected", [
    (["-m"], ["python", "-m", "tame_jax.demo", "--workdir=w"], {}, True),
    (["-m"], ["python", "-u", "-mtame_jax.tools.profile_step"], {}, True),
    (["-m"], ["python", "-m", "tame_jax.train"], {"JAX_PLATFORMS": "cpu"}, True),
    (["-m"], ["python", "-m", "pytest", "tests"], {}, False),  # not ours
    (["/x/demo.py"], ["python", "-m", "tame_jax.demo"], {}, False),  # already running
    (["-m"], ["python", "-m", "tame_jax.demo"], {"JAX_PLATFORMS": "cuda"}, False),
    (["-m"], ["python", "-m", "tame_jax.demo"], {"TAME_JAX_MALLOC": "system"}, False),
    (["-m"], ["python", "-m", "tame_jax.demo"], {"TAME_JAX_MALLOC": "keep"}, False),
    (["-m"], ["python", "-m", "tame_jax.demo"], {"MALLOC_ARENA_MAX": "4"}, False),
    (["-m"], ["python", "-m", "tame_jax.demo"], {"GLIBC_TUNABLES": "x=1"}, False),
])
def test_relaunch_only_for_our_commands_on_cpu_without_allocator_settings(
        argv, orig_argv, environ, expected):
    args = host_memory.relaunch_args(argv, orig_argv, environ, "Linux", "glibc")
    assert (args == [sys.executable, *orig_argv[1:]]) if expected else args is None


def test_no_relaunch_off_glibc():
    argv, orig = ["-m"], ["python", "-m", "tame_jax.demo"]
    assert host_memory.relaunch_args(argv, orig, {}, "Darwin", "") is None
    assert host_memory.relaunch_args(argv, orig, {}, "Linux", "") is None  # musl
