"""Loss parity of training runs: final losses against the first run's, and one PNG with the curves overlaid.

    python -m ghostvis_core.bench.loss_parity RUN_DIR_A RUN_DIR_B [...] --out docs/loss_parity.png
        [--labels bf16 fp8] [--max-rel-diff 0.02] [--last 10]

The final loss of a run is the mean of its last `--last` logged losses (one step's loss is noisy: one batch);
each run is compared with the first: |final - final_0| / final_0, and the command exits 1 when one is above
--max-rel-diff (so a parity check is one command that fails loudly). Reads each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ghostvis_core.errors import ConfigError
from ghostvis_core.train.metrics import read_metrics
from ghostvis_core.train.plot import plot_losses


def final_loss(metrics_path: Path, last: int) -> tuple[float, int]:
    """(mean of the last `last` logged losses, the last step) of one run."""
    if not metrics_path.is_file():
        raise ConfigError(f"{metrics_path}: no metrics.jsonl (is it a run folder of `ghostvis train`?)")
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        raise ConfigError(f"{metrics_path}: no logged losses")
    tail = records[-last:]
    return sum(r["loss"] for r in tail) / len(tail), records[-1]["step"]


def compare_runs(run_dirs: list[Path], labels: list[str], last: int) -> list[dict]:
    """Per run: label, final loss, last step, relative difference to the first run."""
    rows = []
    for run_dir, label in zip(run_dirs, labels, strict=True):
        loss, step = final_loss(run_dir / "metrics.jsonl", last)
        rows.append({"label": label, "run_dir": str(run_dir), "final_loss": loss, "last_step": step})
    base = rows[0]["final_loss"]
    for row in rows:
        row["rel_diff"] = abs(row["final_loss"] - base) / abs(base)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the comparison (and JSON with --json), write the overlay PNG; 1 when a run is out of tolerance."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (the first is the reference)")
    p.add_argument("--labels", nargs="*", default=None)
    p.add_argument("--out", type=Path, required=True, help="PNG path")
    p.add_argument("--title", default="training loss")
    p.add_argument("--last", type=int, default=10, help="logged losses averaged into the final loss")
    p.add_argument("--max-rel-diff", type=float, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    labels = args.labels or [d.name for d in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    rows = compare_runs(args.runs, labels, args.last)
    plot_losses({r["label"]: Path(r["run_dir"]) / "metrics.jsonl" for r in rows}, args.out, args.title)
    for r in rows:
        print(f"{r['label']:>16}: final loss {r['final_loss']:.4f} (mean of the last {args.last} logged, "
              f"step {r['last_step']}), {100 * r['rel_diff']:.2f}% from {rows[0]['label']}")
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(rows, indent=2))
    worst = max(r["rel_diff"] for r in rows)
    if args.max_rel_diff is not None and worst > args.max_rel_diff:
        print(f"out of tolerance: {100 * worst:.2f}% > {100 * args.max_rel_diff:.2f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
