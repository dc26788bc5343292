"""Result tables and comparison plots: `python -m tame_jax.report RESULTS... --out=DIR`.

`tame_jax.evaluate` writes OUT/<method>.{csv,json,md}; this module writes those tables and
compares several: RESULTS are such JSON files (or folders holding them), and DIR gets
comparison.{md,csv} (one row per method and checkpoint) and comparison.png (ROAD MoRF/LeRF
curves, and insertion/deletion AUCs). `python -m tame_jax.compare` is the same command.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

Formats = Mapping[str, Mapping[str, Any]]  # column -> {'percent': bool, 'decimals': int}


def markdown_table(rows: list[dict[str, Any]], head: list[str], formats: Formats | None = None
                   ) -> str:
    """Returns rows as a Markdown table; numbers to each column's decimals (default 2)."""
    formats = formats or {}

    def fmt(k: str, v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{formats.get(k, {}).get('decimals', 2)}f}"
        return str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(k, r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict[str, Any]], columns: list[str], out_dir: str, name: str,
                 formats: Formats | None = None) -> dict[str, str]:
    """Writes rows as OUT/name.csv, .json and .md; returns the three paths."""
    os.makedirs(out_dir, exist_ok=True)
    head = ["method", "step", *columns, "num_images"]
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "json", "md")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(paths["json"], "w") as f:
        json.dump({"columns": head, "formats": dict(formats or {}), "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown_table(rows, head, formats))
    return paths


def load_results(paths: Sequence[str]) -> tuple[list[dict[str, Any]], list[str], dict]:
    """Returns (rows, columns, formats) of all result files; folders are searched for *.json."""
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
    formats: dict[str, Any] = {}
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
        formats.update(data.get("formats", {}))
    if not rows:
        raise ValueError(f"no results found in {list(paths)}")
    return rows, columns, formats


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
    rows, columns, formats = load_results(paths)
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows, columns, formats)
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(out_dir, "comparison.png"))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.report` (and `.compare`); returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.report", description=__doc__)
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
