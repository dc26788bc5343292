"""Compare explanation methods: `python -m tame_jax.compare RESULTS... --out=DIR`.

RESULTS are JSON files written by `tame_jax.evaluate` (or folders holding them). Writes
DIR/comparison.{md,csv} (one row per method and checkpoint) and DIR/comparison.png (ROAD
MoRF/LeRF curves, and insertion/deletion AUCs).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tame_jax.evaluate import markdown_table


def load_results(paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Returns (rows, columns) of all result files; folders are searched for *.json."""
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "*.json"))
                            if os.path.basename(f) != "comparison.json")
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such results file or folder")
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    for f in files:
        with open(f) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} is not a tame_jax.evaluate results file: {e}") from e
        if not isinstance(data, dict) or "rows" not in data or "columns" not in data:
            raise ValueError(f"{f} is not a tame_jax.evaluate results file (no rows/columns)")
        rows += data["rows"]
        columns += [c for c in data["columns"] if c not in columns]
    if not rows:
        raise ValueError(f"no results found in {list(paths)}")
    return rows, columns


def _curve(row: dict[str, Any], order: str) -> tuple[list[float], list[float]]:
    keys = sorted((float(k.rsplit("_", 1)[1]), k) for k in row if k.startswith(f"road_{order}_"))
    return [x for x, _ in keys], [row[k] for _, k in keys]


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Writes the ROAD curves and the insertion/deletion bars of every row to path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [f"{r['method']}" + (f"@{r['step']}" if r.get("step") not in ("-", None) else "")
              for r in rows]
    for ax, order, title in ((axes[0], "morf", "ROAD MoRF (lower is better)"),
                             (axes[1], "lerf", "ROAD LeRF (higher is better)")):
        for r, label in zip(rows, labels, strict=True):
            x, y = _curve(r, order)
            ax.plot(x, y, marker="o", label=label)
        ax.set_xlabel("% pixels removed")
        ax.set_ylabel("% top-1 unchanged")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    idx = range(len(rows))
    w = 0.4
    axes[2].bar([i - w / 2 for i in idx], [r.get("insertion", 0) for r in rows], w,
                label="insertion AUC (higher is better)")
    axes[2].bar([i + w / 2 for i in idx], [r.get("deletion", 0) for r in rows], w,
                label="deletion AUC (lower is better)")
    axes[2].set_xticks(list(idx), labels, rotation=30, ha="right", fontsize=8)
    axes[2].legend(fontsize=8)
    axes[2].set_title("Insertion / deletion")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: Sequence[str], out_dir: str) -> str:
    """Returns the Markdown table of all results; writes it with a CSV and the figure."""
    rows, columns = load_results(paths)
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows, columns)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(out_dir, "comparison.png"))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.compare`; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.compare", description=__doc__)
    p.add_argument("results", nargs="+", help="results JSON files or folders")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        print(compare(args.results, args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
