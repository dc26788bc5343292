"""The platform resolution check (`tame_jax.tools.check_platforms`, run by .ci/run) catches a
platform without wheels, and chooses by the target's environment markers, offline: pip resolves
against a folder of tiny fake wheels (`--no-index --find-links`)."""

from __future__ import annotations

import os
import zipfile

import pytest

from tame_jax.tools import check_platforms


def _fake_wheel(folder, name: str, tag: str, requires: tuple[str, ...] = ()) -> None:
    """Writes a minimal wheel of package `name` 1.0 for platform tag `tag`."""
    dist = f"{name}-1.0"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires))
    wheel = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
    path = os.path.join(folder, f"{dist}-{tag}.whl")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", wheel)
        z.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture
def index(tmp_path):
    """A wheel folder: 'corelib' for every platform, 'cpuonly' only for Linux x86-64 and
    Windows, 'fullbuild' only for Linux aarch64 and macOS arm64 (like tensorflow-cpu and
    tensorflow); 'linuxonly' for Linux x86-64 only, required by 'needslinux'."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "corelib", "py3-none-any")
    for tag in ("cp311-cp311-manylinux_2_17_x86_64", "cp311-cp311-win_amd64"):
        _fake_wheel(wheels, "cpuonly", tag)
    for tag in ("cp311-cp311-manylinux_2_28_aarch64", "cp311-cp311-macosx_11_0_arm64"):
        _fake_wheel(wheels, "fullbuild", tag)
    _fake_wheel(wheels, "linuxonly", "cp311-cp311-manylinux_2_17_x86_64")
    _fake_wheel(wheels, "needslinux", "py3-none-any", ("linuxonly",))
    return f"--no-index --find-links={wheels}"


def _pyproject(tmp_path, deps: list[str]) -> str:
    path = tmp_path / "pyproject.toml"
    lines = ",\n".join(f'  "{d}"' for d in deps)
    path.write_text(f'[project]\nname = "x"\nversion = "0"\ndependencies = [\n{lines}\n]\n')
    return str(path)


# the markers of pyproject.toml's TensorFlow lines, on fake packages
CPU = ("cpuonly; (sys_platform == 'linux' and platform_machine == 'x86_64') or "
       "sys_platform == 'win32'")
FULL = ("fullbuild; sys_platform != 'win32' and (sys_platform != 'linux' or "
        "platform_machine != 'x86_64')")


def test_markers_pick_the_build_each_platform_has(tmp_path, index, capsys):
    pyproject = _pyproject(tmp_path, ["corelib", CPU, FULL])
    code = check_platforms.main(["--pyproject", pyproject, "--pip_args", index, "--no_extras"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in check_platforms.PLATFORMS:
        assert f"ok     {name}: 2 packages" in out  # corelib + the one build that exists there


def test_a_platform_without_a_wheel_fails_the_check(tmp_path, index, capsys):
    # needslinux is pure Python but pulls linuxonly, which has no macOS/aarch64/Windows wheel
    pyproject = _pyproject(tmp_path, ["corelib", "needslinux"])
    code = check_platforms.main(["--pyproject", pyproject, "--pip_args", index, "--no_extras",
                                 "--platforms", "linux-x86_64,macos-arm64,linux-aarch64"])
    captured = capsys.readouterr()
    assert code == 1
    assert "ok     linux-x86_64: 3 packages" in captured.out
    assert "FAILED macos-arm64: linuxonly has no wheel for macos-arm64" in captured.out
    assert "FAILED linux-aarch64: linuxonly has no wheel" in captured.out
    assert "do not resolve on: macos-arm64, linux-aarch64" in captured.err


def test_the_markers_of_the_target_not_the_host_are_evaluated(tmp_path, index, capsys):
    # Without the marker environment of the target, pip would evaluate the markers on this
    # Linux x86-64 host and ask for cpuonly (no macOS wheel) on macOS: a false failure.
    pyproject = _pyproject(tmp_path, [CPU, FULL])
    assert check_platforms.main(["--pyproject", pyproject, "--pip_args", index, "--no_extras",
                                 "--platforms", "macos-arm64"]) == 0
    assert "ok     macos-arm64: 1 packages" in capsys.readouterr().out


def test_missing_packages_are_read_from_pip_errors():
    text = ("ERROR: No matching distribution found for nvidia-cuda-cupti>=13.0.48\n"
            "Additionally, some packages in these conflicts have no matching distributions "
            "available for your environment:\n    promise\n    jaxlib\n\nTo fix this")
    assert check_platforms.missing_packages(text) == ["jaxlib", "nvidia-cuda-cupti", "promise"]


def test_the_project_declares_the_builds_per_platform():
    reqs = check_platforms.requirements(os.path.join(check_platforms.REPO, "pyproject.toml"))
    tf = [r for r in reqs if r.startswith("tensorflow")]
    assert any(r.startswith("tensorflow-cpu") and "win32" in r for r in tf)
    assert any(r.startswith("tensorflow>") and "platform_machine != 'x86_64'" in r for r in tf)
    extras = check_platforms.requirements(os.path.join(check_platforms.REPO, "pyproject.toml"),
                                          ["cuda13"])
    assert "jax[cuda13]" in extras
