"""Check that the dependencies resolve to wheels on every platform the README promises.

    python -m tame_jax.tools.check_platforms [--platforms=linux-x86_64,macos-arm64]
        [--python=3.11] [--pyproject=pyproject.toml] [--pip_args="--no-index --find-links=DIR"]

For each platform (and each extra that platform offers) it runs
`pip install --dry-run --ignore-installed --only-binary=:all: --platform=... --python-version=...`
on the requirements of pyproject.toml, and prints one line per check; the exit code is 1 when
any platform fails, so a dependency without a wheel for, say, Linux aarch64 fails CI (`.ci/run`
runs this).

Two things `pip --platform` alone gets wrong, handled here:
- pip evaluates environment markers (`; sys_platform == 'darwin'`) against the machine it runs
  on, not the target. pip is run with its marker environment replaced by the target's, so the
  markers of every package in the tree (not only ours) choose as they would there.
- a pure-Python package published only as a source archive (tfds needs `promise`) installs
  everywhere, but `--only-binary` refuses it. Such a package is built into a wheel here; when
  that wheel is `py3-none-any` it stands for every platform and the check is retried with it.
  A package whose wheel would be platform-specific fails the platform.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Platform:
    """A target: pip's platform tags, its environment-marker values, the extras it offers."""

    tags: tuple[str, ...]
    markers: dict[str, str]
    extras: tuple[str, ...] = ()


_LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
GLIBC = 35  # the target's glibc 2.x: Ubuntu 22.04 (GH200 and most GPU images); newer is fine


def _linux(arch: str) -> tuple[str, ...]:
    """Returns every wheel platform tag a Linux machine with glibc 2.GLIBC accepts."""
    legacy = ("manylinux2014", "manylinux2010", "manylinux1")
    return (*(f"manylinux_2_{v}_{arch}" for v in range(GLIBC, 4, -1)),
            *(f"{tag}_{arch}" for tag in legacy), f"linux_{arch}")


PLATFORMS: dict[str, Platform] = {
    "linux-x86_64": Platform(_linux("x86_64"), {**_LINUX, "platform_machine": "x86_64"},
                             ("cuda12", "cuda13", "tpu")),
    "linux-aarch64": Platform(_linux("aarch64"), {**_LINUX, "platform_machine": "aarch64"},
                              ("cuda12", "cuda13")),
    # pip expands a macosx tag to the older releases and universal2
    "macos-arm64": Platform(("macosx_14_0_arm64",), {
        "sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
        "platform_machine": "arm64"}),
    "windows-x86_64": Platform(("win_amd64",), {
        "sys_platform": "win32", "platform_system": "Windows", "os_name": "nt",
        "platform_machine": "AMD64"}),
}

# Runs pip with the marker environment of the target (a JSON dict in TAME_MARKER_ENV).
_PIP_WITH_MARKERS = """
import json, os, sys
from pip._vendor.packaging import markers
_base = markers.default_environment()
_target = dict(_base, **json.loads(os.environ["TAME_MARKER_ENV"]))
markers.default_environment = lambda: dict(_target)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def requirements(pyproject: str, extras: Sequence[str] = ()) -> list[str]:
    """Returns the base requirements of pyproject.toml plus those of the given extras."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"{pyproject} has no extra {extra!r}; it has {sorted(optional)}")
        reqs += optional[extra]
    return reqs


def marker_environment(platform: Platform, python: str) -> dict[str, str]:
    """Returns the environment-marker values of the target platform and Python version."""
    return {**platform.markers, "python_version": python, "python_full_version": f"{python}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def missing_packages(pip_output: str) -> list[str]:
    """Returns the packages pip found no distribution for, from its error output."""
    names = re.findall(r"No matching distribution found for ([A-Za-z0-9_.\-]+)", pip_output)
    block = re.search(r"no matching distributions available for your environment:\n"
                      r"((?:[ \t]+\S+\n?)+)", pip_output)
    if block:
        names += block.group(1).split()
    return sorted(set(names))


def _pip_dry_run(reqs: Sequence[str], platform: Platform, python: str, target: str,
                 pip_args: Sequence[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _PIP_WITH_MARKERS, "install", "--dry-run", "--ignore-installed",
           "--only-binary=:all:", f"--python-version={python}", f"--target={target}",
           "--disable-pip-version-check", "--progress-bar=off",
           *(f"--platform={t}" for t in platform.tags), *pip_args, *reqs]
    env = dict(os.environ, TAME_MARKER_ENV=json.dumps(marker_environment(platform, python)))
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _build_pure_wheel(name: str, wheelhouse: str, pip_args: Sequence[str]) -> str | None:
    """Returns the py3-none-any wheel built from the source archive of `name`, else None."""
    before = set(os.listdir(wheelhouse))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                        "--disable-pip-version-check", f"--wheel-dir={wheelhouse}", *pip_args,
                        name], capture_output=True, text=True)
    built = sorted(set(os.listdir(wheelhouse)) - before)
    if r.returncode or not built:
        return None
    return built[0] if built[0].endswith("-none-any.whl") else None


def check(platform_name: str, extras: Sequence[str], *, python: str = "3.11",
          pyproject: str = os.path.join(REPO, "pyproject.toml"), pip_args: Sequence[str] = (),
          wheelhouse: str | None = None) -> tuple[bool, str]:
    """Returns (resolves, message) for the requirements (+ extras) on one platform."""
    platform = PLATFORMS[platform_name]
    reqs = requirements(pyproject, extras)
    built: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        wheelhouse = wheelhouse or os.path.join(tmp, "wheels")
        os.makedirs(wheelhouse, exist_ok=True)
        target = os.path.join(tmp, "target")
        tried: set[str] = set()
        while True:
            args = [*pip_args, f"--find-links={wheelhouse}"]
            r = _pip_dry_run(reqs, platform, python, target, args)
            if r.returncode == 0:
                would = re.search(r"Would install (.*)", r.stdout)
                count = len(would.group(1).split()) if would else 0
                note = f" (built pure-Python wheels: {', '.join(built)})" if built else ""
                return True, f"{count} packages{note}"
            missing = [m for m in missing_packages(r.stdout + r.stderr) if m not in tried]
            if not missing:
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
                return False, tail
            tried.update(missing)
            for name in missing:
                wheel = _build_pure_wheel(name, wheelhouse, pip_args)
                if wheel is None:
                    return False, (f"{name} has no wheel for {platform_name} (Python {python}) "
                                   "and is not a pure-Python package that could be built for it")
                built.append(wheel)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 1 when any platform fails to resolve."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.tools.check_platforms",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--platforms", default=",".join(PLATFORMS),
                   help=f"comma-separated, from {', '.join(PLATFORMS)}")
    p.add_argument("--python", default="3.11", help="target Python version")
    p.add_argument("--pyproject", default=os.path.join(REPO, "pyproject.toml"))
    p.add_argument("--pip_args", default="", help="extra pip arguments, e.g. an index")
    p.add_argument("--no_extras", action="store_true", help="check the base install only")
    args = p.parse_args(argv)
    names = [n for n in args.platforms.split(",") if n]
    unknown = [n for n in names if n not in PLATFORMS]
    if unknown:
        p.error(f"unknown platform(s) {unknown}; choose from {', '.join(PLATFORMS)}")
    failed = []
    with tempfile.TemporaryDirectory() as wheelhouse:  # pure wheels built once, shared
        for name in names:
            extras_list = [()] + ([] if args.no_extras else [(e,) for e in PLATFORMS[name].extras])
            for extras in extras_list:
                label = name + (f" [{','.join(extras)}]" if extras else "")
                ok, message = check(name, extras, python=args.python, pyproject=args.pyproject,
                                    pip_args=shlex.split(args.pip_args), wheelhouse=wheelhouse)
                print(f"{'ok    ' if ok else 'FAILED'} {label}: {message}", flush=True)
                if not ok:
                    failed.append(label)
    if failed:
        print(f"dependencies do not resolve on: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all platforms resolve (Python {args.python})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
