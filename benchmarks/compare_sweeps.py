"""Two trade-off sweeps side by side, paired by seed: what a code change did to each method.

Reads two `runs.csv` files written by `benchmarks/tradeoff.py` (before and after a change) and
prints, per method, the accuracy of each seed before and after, the mean of the paired
differences and its spread, and the mean latency ratio (batch 64, against each sweep's own
dense mean) before and after. Seeds are paired because each seed fixes the data split and the
initial weights, so the difference of a pair is the change's effect on the same run.

    python benchmarks/compare_sweeps.py docs/results/runs-before-issue13.csv docs/results/runs.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {(row["method"], int(row["seed"])): row for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    before, after = read(args.before), read(args.after)
    methods = list(dict.fromkeys(m for m, _ in after))
    header = [
        "method",
        "seeds",
        "val acc % before (per seed)",
        "after (per seed)",
        "paired difference, points (mean ± std)",
        "latency b64 before",
        "after",
    ]
    rows = []
    for method in methods:
        seeds = sorted(s for m, s in after if m == method and (m, s) in before)
        if not seeds:
            continue
        old = [100 * float(before[method, s]["val_acc"]) for s in seeds]
        new = [100 * float(after[method, s]["val_acc"]) for s in seeds]
        diff = [n - o for n, o in zip(new, old, strict=True)]
        spread = statistics.stdev(diff) if len(diff) > 1 else 0.0
        lat_old = statistics.mean(float(before[method, s]["ms_b64_ratio"]) for s in seeds)
        lat_new = statistics.mean(float(after[method, s]["ms_b64_ratio"]) for s in seeds)
        rows.append(
            [
                method,
                ",".join(map(str, seeds)),
                " / ".join(f"{v:.2f}" for v in old) + f" (mean {statistics.mean(old):.2f})",
                " / ".join(f"{v:.2f}" for v in new) + f" (mean {statistics.mean(new):.2f})",
                f"{statistics.mean(diff):+.2f} ± {spread:.2f}",
                f"{lat_old:.3f}",
                f"{lat_new:.3f}",
            ]
        )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
