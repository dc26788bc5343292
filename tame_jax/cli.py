"""What every command-line entry point shares: the --config/--workdir/--print_config flags, a
clear error for an unknown `--config.X` key, the start-up boilerplate (quiet logs, multi-host
setup), and the progress bar (tqdm on a terminal, a line at a time in logs, process 0 only).

Commands that read a training workdir (evaluate) may leave --config out: the workdir's own
config.json is then the config, and `--config.X=...` overrides still apply to it."""

from __future__ import annotations

import difflib
import os
import runpy
import sys
from collections.abc import Callable
from typing import Any, TextIO

from absl import app, flags
from ml_collections import config_flags

_CONFIG_FROM_WORKDIR = False  # set by define_flags(config_from_workdir=True)
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workdirs.py")


def define_flags(*, config: str | None = None, workdir: str | None = None,
                 workdir_help: str = "where checkpoints, logs and results go",
                 config_from_workdir: bool = False) -> None:
    """Defines --config (a config file, with --config.X=... overrides), --workdir and
    --print_config.

    A flag without a default is required, except --config with config_from_workdir: then it
    defaults to WORKDIR/config.json.
    """
    global _CONFIG_FROM_WORKDIR
    _CONFIG_FROM_WORKDIR = config_from_workdir
    help_ = "path to a config file" + (" (default: the workdir's config.json)"
                                       if config_from_workdir else "")
    config_flags.DEFINE_config_file("config", config, help_, lock_config=True)
    flags.DEFINE_string("workdir", workdir, workdir_help)
    flags.DEFINE_bool("print_config", False,
                      "print every config field with its value and meaning, then exit")
    required = [("workdir", workdir)] + ([] if config_from_workdir else [("config", config)])
    flags.mark_flags_as_required([n for n, d in required if d is None])


def _flag_value(argv: list[str], name: str) -> str | None:
    """Returns the value of --name=V or --name V in argv (the last one), else None."""
    value = None
    for i, a in enumerate(argv[1:], 1):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def with_workdir_config(argv: list[str]) -> list[str]:
    """Returns argv with --config=<workdir's config.json> added when --config is missing and
    --workdir is given (so that --config.X=... overrides apply to the workdir's config)."""
    workdir = _flag_value(argv, "workdir")
    if _flag_value(argv, "config") is not None or not workdir:
        return argv
    return [argv[0], f"--config={WORKDIR_CONFIG}:{workdir}", *argv[1:]]


def config_reference(config: Any = None) -> str:
    """Returns the Markdown table of every config field: name, value, meaning."""
    from tame_jax.config import reference_table

    return reference_table(config)


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (logs, CI)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> None:
        """Writes s as a line, without the redraw characters."""
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        """Flushes the stream."""
        self.stream.flush()


def progress_bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True
                 ) -> Any:
    """Returns a tqdm bar (count, rate, ETA) on stderr: redrawn in place on a terminal, a line
    every 30 s otherwise; silent on processes other than 0 or when not enabled."""
    import jax
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr if tty else _Lines(sys.stderr),
                disable=not enabled or jax.process_index() != 0, dynamic_ncols=tty,
                mininterval=0.1 if tty else 30.0, ascii=not tty, ncols=None if tty else 90)


def _load_config_file(argv: list[str]) -> Any:
    """Returns the config that --config=FILE[:ARG] in argv names (None if there is none)."""
    spec = None
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    if not spec:
        return None
    path, _, arg = spec.partition(":")
    get_config = runpy.run_path(path)["get_config"]
    return get_config(arg) if arg else get_config()


def _unknown_config_key(argv: list[str]) -> str | None:
    """Returns a message naming the first --config.X=... override whose key does not exist."""
    try:
        config = _load_config_file(argv)
    except Exception:  # the normal parse reports problems with the file itself
        return None
    if config is None:
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[2:].split("=", 1)[0].split(".")[1:]
        node, where = config, "config"
        for key in path:
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {where}.{close[0]}?" if close else ""
                return (f"unknown config key {'.'.join(['config', *path])!r} in {arg!r}: {where} "
                        f"has no field {key!r}.{hint} Its fields: {', '.join(sorted(fields))}.")
            node, where = node[key], f"{where}.{key}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Returns the arguments left after parsing flags; exits with a clear message on a bad key."""
    if _CONFIG_FROM_WORKDIR:
        argv = with_workdir_config(argv)
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections' message names no flag
        message = _unknown_config_key(argv)
        if message is None:
            raise
        sys.exit(f"FATAL Flags parsing error: {message}")
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpfull for help on flags.")


def run(main: Callable[[Any, str], Any]) -> None:
    """Parses the flags and calls main(config, workdir), as every entry point does.

    Before main: extra positional arguments are refused, orbax's per-save INFO lines are
    hidden, and the process joins a multi-process run where there is one (it must, before any
    JAX computation starts the backend).
    """
    from tame_jax import checkpoints, distributed

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        checkpoints.quiet_orbax_logs()
        config = flags.FLAGS.config
        if config is None:
            raise app.UsageError("--config is required (or a --workdir with a config.json)")
        if flags.FLAGS.print_config:
            print(config_reference(config), end="")
            return
        distributed.setup_distributed(config)
        main(config, flags.FLAGS.workdir)

    app.run(_main, flags_parser=parse_flags)
