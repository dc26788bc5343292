"""Result tables and comparisons with uncertainty: `python -m tame_jax.report RESULTS... --out=DIR`.

`tame_jax.evaluate` writes OUT/<method>.{csv,json,md} (one row per method and checkpoint) and
OUT/<method>.per_image.csv (every image's value of every metric); this module writes those
tables and compares several: RESULTS are such JSON files (or folders holding them), and DIR
gets
- comparison.md: each mean with its 95% bootstrap confidence interval, then the paired
  difference of the reference method (TAME) against each other method per metric, with its
  interval and whether the reference is better, worse or not clearly different;
- comparison.csv (means and intervals) and comparison_paired.csv (the differences);
- comparison.png: ROAD MoRF/LeRF curves with interval bands, insertion/deletion AUCs and the
  other metrics with error bars.
The bootstrap resamples images (10000 times; a seed per row or pair, derived from its names),
so two runs on the same results print identical tables. `python -m tame_jax.compare` is the
same command.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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


PER_IMAGE_KEYS = ("image", "label", "class")
BOOTSTRAP_SAMPLES = 10_000
PerImage = dict[str, np.ndarray]  # column -> (N,) values, plus 'image', 'label', 'class'


def write_tables(rows: list[dict[str, Any]], columns: list[str], out_dir: str, name: str,
                 formats: Formats | None = None,
                 per_image: Sequence[tuple[Any, PerImage]] | None = None) -> dict[str, str]:
    """Writes rows as OUT/name.csv, .json and .md, and the per-image values of each row's
    (step, values) as OUT/name.per_image.csv; returns the paths.

    With per-image values, the Markdown shows every mean with its 95% bootstrap interval and
    the CSV has `<column>_lo` / `<column>_hi` beside each column.
    """
    os.makedirs(out_dir, exist_ok=True)
    head = ["method", "step", *columns, "num_images"]
    paths = {ext: os.path.join(out_dir, f"{name}.{ext}") for ext in ("csv", "json", "md")}
    table_rows, csv_head = rows, head
    if per_image is not None:
        table_rows = with_intervals(
            rows, columns, {_row_key(r): v for r, (_, v) in zip(rows, per_image, strict=True)})
        csv_head = ["method", "step", *[f"{c}{x}" for c in columns for x in ("", "_lo", "_hi")],
                    "num_images"]
        paths["per_image"] = os.path.join(out_dir, f"{name}.per_image.csv")
        with open(paths["per_image"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "step", *PER_IMAGE_KEYS, *columns])
            for (step, values), row in zip(per_image, rows, strict=True):
                for i in range(len(values["image"])):
                    w.writerow([row["method"], step, *(int(values[k][i]) for k in PER_IMAGE_KEYS),
                                *(repr(float(values[c][i])) for c in columns)])
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_head, extrasaction="ignore")
        w.writeheader()
        w.writerows(table_rows)
    with open(paths["json"], "w") as f:
        meta = {"columns": head, "formats": dict(formats or {}), "rows": rows}
        if per_image is not None:
            meta["per_image"] = os.path.basename(paths["per_image"])
        json.dump(meta, f, indent=1)
    with open(paths["md"], "w") as f:
        if per_image is None:
            f.write(markdown_table(rows, head, formats))
        else:
            f.write(interval_table(table_rows, columns, formats or {}))
    return paths


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row["method"]), str(row.get("step", "-"))


def read_per_image(path: str) -> dict[tuple[str, str], PerImage]:
    """Returns {(method, step): {column: (N,) values}} from a per-image CSV."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            d = out.setdefault((r.pop("method"), r.pop("step")), {})
            for k, v in r.items():
                d.setdefault(k, []).append(float(v))
    return {key: {k: np.asarray(v, np.int64 if k in PER_IMAGE_KEYS else np.float64)
                  for k, v in d.items()} for key, d in out.items()}


def load_results(paths: Sequence[str]
                 ) -> tuple[list[dict[str, Any]], list[str], dict, dict[tuple[str, str], PerImage]]:
    """Returns (rows, columns, formats, per-image values by (method, step)) of all result
    files; folders are searched for *.json. Rows without a per-image file have no entry."""
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
    per_image: dict[tuple[str, str], PerImage] = {}
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
        if data.get("per_image"):
            csv_path = os.path.join(os.path.dirname(f), data["per_image"])
            if not os.path.isfile(csv_path):
                raise FileNotFoundError(f"{f} names the per-image values {csv_path}, which is "
                                        "missing: rerun tame_jax.evaluate for it")
            per_image.update(read_per_image(csv_path))
    if not rows:
        raise ValueError(f"no results found in {list(paths)}")
    return rows, columns, formats, per_image


# ----------------------------------------------------------------------------- uncertainty


def _seed(*names: str) -> int:
    """Returns a seed from names (stable across runs and processes, unlike hash())."""
    return zlib.crc32("|".join(names).encode())


def bootstrap_means(values: np.ndarray, seed: int, samples: int = BOOTSTRAP_SAMPLES,
                    chunk: int = 500) -> np.ndarray:
    """Returns (samples, C) means of `values` (N, C) over bootstrap resamples of the N rows.

    Each resample draws N rows with replacement (multinomial counts); the draws come from
    numpy's PCG64 generator seeded with `seed`, so the result is the same on every run.
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, samples, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, samples - start))
        out.append(counts @ values / n)
    return np.concatenate(out)


def confidence_intervals(values: np.ndarray, seed: int, level: float = 0.95,
                         samples: int = BOOTSTRAP_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Returns (low, high), (C,) each: percentile bootstrap intervals of the means of the
    columns of values (N, C)."""
    means = bootstrap_means(values, seed, samples)
    tail = 100 * (1 - level) / 2
    return np.percentile(means, tail, axis=0), np.percentile(means, 100 - tail, axis=0)


def paired_comparison(ref: PerImage, other: PerImage, columns: Sequence[str], seed: int,
                      samples: int = BOOTSTRAP_SAMPLES) -> list[dict[str, Any]]:
    """Returns, per column, the mean of ref - other over the images both have, its 95% paired
    bootstrap interval and a two-sided bootstrap p-value (images resampled jointly)."""
    common, ri, oi = np.intersect1d(ref["image"], other["image"], return_indices=True)
    if len(common) == 0:
        return []
    diffs = np.stack([ref[c][ri] - other[c][oi] for c in columns], 1)  # (N, C)
    means = bootstrap_means(diffs, seed, samples)
    lo, hi = np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)
    p = np.minimum(1.0, 2 * np.minimum((means <= 0).mean(0), (means >= 0).mean(0)))
    return [{"metric": c, "n": len(common), "diff": float(diffs[:, j].mean()),
             "lo": float(lo[j]), "hi": float(hi[j]), "p": float(p[j])}
            for j, c in enumerate(columns)]


def verdict(diff: Mapping[str, Any], better: str) -> str:
    """Returns 'better', 'worse' (for the reference) or 'no clear difference' (0 inside the
    interval of the difference)."""
    if diff["lo"] > 0 or diff["hi"] < 0:
        up = diff["diff"] > 0
        return "better" if up == (better == "higher") else "worse"
    return "no clear difference"


def with_intervals(rows: list[dict[str, Any]], columns: Sequence[str],
                   per_image: Mapping[tuple[str, str], PerImage]) -> list[dict[str, Any]]:
    """Returns copies of rows with `<col>_lo` and `<col>_hi` (95% bootstrap) where the row's
    per-image values are known."""
    out = []
    for row in rows:
        row = dict(row)
        values = per_image.get(_row_key(row))
        cols = [c for c in columns if values is not None and c in values]
        if cols:
            lo, hi = confidence_intervals(np.stack([values[c] for c in cols], 1),
                                          _seed(*_row_key(row)))
            for j, c in enumerate(cols):
                row[f"{c}_lo"], row[f"{c}_hi"] = float(lo[j]), float(hi[j])
        out.append(row)
    return out


def reference_row(rows: Sequence[Mapping[str, Any]], name: str | None = None
                  ) -> Mapping[str, Any] | None:
    """Returns the row the others are compared with: the last row of method `name` (default
    'tame', TAME's latest checkpoint listed), or None if there is none."""
    matches = [r for r in rows if str(r["method"]) == (name or "tame")]
    return matches[-1] if matches else None


# ----------------------------------------------------------------------------- tables


def _fmt(v: float, decimals: int, sign: bool = False) -> str:
    return f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"


def interval_table(rows: list[dict[str, Any]], columns: Sequence[str], formats: Formats) -> str:
    """Returns a Markdown table: each mean with its [low, high] interval where known."""
    lines = ["| method | step | n | " + " | ".join(columns) + " |",
             "|" + "---|" * (3 + len(columns))]
    for r in rows:
        cells = []
        for c in columns:
            d = formats.get(c, {}).get("decimals", 2)
            if c not in r or not isinstance(r[c], (int, float)):
                cells.append("")
            elif f"{c}_lo" in r:
                cells.append(f"{_fmt(r[c], d)} [{_fmt(r[f'{c}_lo'], d)}, {_fmt(r[f'{c}_hi'], d)}]")
            else:
                cells.append(_fmt(r[c], d))
        lines.append(f"| {r['method']} | {r.get('step', '-')} | {r.get('num_images', '')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(ref: Mapping[str, Any], comparisons: Sequence[dict[str, Any]],
                 columns: Sequence[str], formats: Formats) -> str:
    """Returns a Markdown table: per baseline (rows) and metric (columns), the reference minus
    the baseline with its interval, and 'better'/'worse' where the interval excludes 0."""
    lines = [f"| {ref['method']} − … | n | " + " | ".join(columns) + " |",
             "|" + "---|" * (2 + len(columns))]
    for comp in comparisons:
        by = {d["metric"]: d for d in comp["diffs"]}
        n = comp["diffs"][0]["n"] if comp["diffs"] else 0
        cells = []
        for c in columns:
            if c not in by:
                cells.append("")
                continue
            d, dec = by[c], formats.get(c, {}).get("decimals", 2)
            word = {"better": " **better**", "worse": " *worse*"}.get(d["verdict"], "")
            cells.append(f"{_fmt(d['diff'], dec, True)} [{_fmt(d['lo'], dec, True)}, "
                         f"{_fmt(d['hi'], dec, True)}]{word}")
        lines.append(f"| {comp['method']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curve(row: dict[str, Any], order: str) -> tuple[list[float], list[float], list, list]:
    keys = sorted((float(k.rsplit("_", 1)[1]), k) for k in row
                  if k.startswith(f"road_{order}_") and not k.endswith(("_lo", "_hi")))
    return ([x for x, _ in keys], [row[k] for _, k in keys],
            [row.get(f"{k}_lo", math.nan) for _, k in keys],
            [row.get(f"{k}_hi", math.nan) for _, k in keys])


def _label(row: Mapping[str, Any]) -> str:
    return f"{row['method']}" + (f"@{row['step']}" if row.get("step") not in ("-", None) else "")


def plot(rows: list[dict[str, Any]], path: str, formats: Formats | None = None) -> None:
    """Writes comparison.png: ROAD curves (with 95% interval bands), insertion/deletion AUCs
    and the other metrics (with 95% interval error bars) of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = formats or {}
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.5))
    labels = [_label(r) for r in rows]
    for ax, order, title in ((axes[0], "morf", "ROAD MoRF (lower is better)"),
                             (axes[1], "lerf", "ROAD LeRF (higher is better)")):
        levels: set[float] = set()
        for i, (r, label) in enumerate(zip(rows, labels, strict=True)):
            x, y, lo, hi = _curve(r, order)
            levels.update(x)
            x = np.asarray(x) + 0.8 * (i - (len(rows) - 1) / 2)  # side by side, bars apart
            line, = ax.plot(x, y, marker="o", label=label)
            if not np.isnan(lo).all():
                if len(x) > 1:
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
                ax.errorbar(x, y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], fmt="none",
                            ecolor=line.get_color(), capsize=3)
        ax.margins(x=0.15)
        ax.set_xticks(sorted(levels))
        ax.set_xlabel("% pixels removed (methods side by side)")
        ax.set_ylabel("% top-1 unchanged")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)

    def bars(ax, cols: Sequence[str], title: str) -> None:
        width = 0.8 / max(len(cols), 1)
        idx = np.arange(len(rows))
        for j, c in enumerate(cols):
            y = [r.get(c, np.nan) for r in rows]
            err = [[r[c] - r[f"{c}_lo"] if f"{c}_lo" in r else 0 for r in rows],
                   [r[f"{c}_hi"] - r[c] if f"{c}_hi" in r else 0 for r in rows]]
            better = formats.get(c, {}).get("better", "higher")
            ax.bar(idx + (j - (len(cols) - 1) / 2) * width, y, width, yerr=err, capsize=3,
                   label=f"{c} ({better} is better)")
        ax.set_xticks(list(idx), labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")

    bars(axes[2], [c for c in ("insertion", "deletion") if any(c in r for r in rows)],
         "Insertion / deletion AUC")
    other = [c for c in formats if formats[c].get("percent") and not c.startswith("road_")
             and any(c in r for r in rows)]
    bars(axes[3], other, "Other metrics (%)")
    fig.suptitle("bars and bands: 95% bootstrap intervals over images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: Sequence[str], out_dir: str, reference: str | None = None) -> str:
    """Returns the Markdown comparison of all results (means with 95% bootstrap intervals and
    paired differences against the reference, default TAME); writes it with the CSVs and the
    figure."""
    rows, columns, formats, per_image = load_results(paths)
    metrics_ = [c for c in columns if c not in ("method", "step", "num_images")]
    rows = with_intervals(rows, metrics_, per_image)
    os.makedirs(out_dir, exist_ok=True)
    text = ("Means with 95% bootstrap confidence intervals (percentile method, "
            f"{BOOTSTRAP_SAMPLES} resamples of the images; n = images).\n\n"
            + interval_table(rows, metrics_, formats))
    ref = reference_row(rows, reference)
    comparisons = []
    if ref is not None and _row_key(ref) in per_image:
        for r in rows:
            if r is ref or _row_key(r) not in per_image:
                continue
            diffs = paired_comparison(per_image[_row_key(ref)], per_image[_row_key(r)],
                                      [c for c in metrics_ if c in per_image[_row_key(r)]
                                       and c in per_image[_row_key(ref)]],
                                      _seed(*_row_key(ref), *_row_key(r)))
            for d in diffs:
                d["verdict"] = verdict(d, formats.get(d["metric"], {}).get("better", "higher"))
            comparisons.append({"method": _label(r), "diffs": diffs})
        text += (f"\nPaired differences {_label(ref)} − method on the images both have, with "
                 "95% paired bootstrap intervals; **better** / *worse*: the interval excludes 0 "
                 f"in {_label(ref)}'s favour / against it (otherwise no clear difference).\n\n"
                 + paired_table(ref, comparisons, metrics_, formats))
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write(text)
    head = ["method", "step", "num_images"] + [f"{c}{s}" for c in metrics_
                                               for s in ("", "_lo", "_hi")]
    with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, "comparison_paired.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["reference", "method", "metric", "better", "n", "diff", "lo", "hi", "p",
                    "verdict"])
        for comp in comparisons:
            for d in comp["diffs"]:
                w.writerow([_label(ref), comp["method"], d["metric"],
                            formats.get(d["metric"], {}).get("better", "higher"), d["n"],
                            repr(d["diff"]), repr(d["lo"]), repr(d["hi"]), repr(d["p"]),
                            d["verdict"]])
    plot(rows, os.path.join(out_dir, "comparison.png"), formats)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `python -m tame_jax.report` (and `.compare`); returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tame_jax.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--reference", default="tame",
                   help="the method the others are compared with, pairwise (default tame)")
    args = p.parse_args(argv)
    try:
        print(compare(args.results, args.out, args.reference))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
