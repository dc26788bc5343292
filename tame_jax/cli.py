"""What every command-line entry point shares: the --config/--workdir flags, a clear error for
an unknown `--config.X` key, and the start-up boilerplate (quiet logs, multi-host setup)."""

from __future__ import annotations

import difflib
import runpy
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags


def define_flags(*, config: str | None = None, workdir: str | None = None,
                 workdir_help: str = "where checkpoints, logs and results go") -> None:
    """Defines --config (a config file, with --config.X=... overrides) and --workdir.

    A flag without a default is required.
    """
    config_flags.DEFINE_config_file("config", config, "path to a config file", lock_config=True)
    flags.DEFINE_string("workdir", workdir, workdir_help)
    flags.mark_flags_as_required([n for n, d in (("config", config), ("workdir", workdir))
                                  if d is None])


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
        distributed.setup_distributed(config)
        main(config, flags.FLAGS.workdir)

    app.run(_main, flags_parser=parse_flags)
