"""loss.png: the training loss curve from metrics.jsonl (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from ghostvis_core.atomic import atomic_path
from ghostvis_core.log import get_logger
from ghostvis_core.train.metrics import read_metrics


def plot_loss(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Write the loss-vs-step curve of `metrics_path` to `out_path` (PNG); returns out_path, or None (with one log
    line) when matplotlib is not installed: the plot is optional and never fails a run."""
    return plot_losses({"": metrics_path}, out_path, title)


def plot_losses(curves: dict[str, Path], out_path: Path, title: str = "") -> Path | None:
    """Several runs' loss curves overlaid in one PNG ({legend label: metrics.jsonl}; one unlabeled curve has no
    legend); None, with one log line, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        get_logger().info("loss plot skipped: matplotlib is not installed (pip install 'ghostvis[plot]'); "
                          f"the losses are in {', '.join(str(p) for p in curves.values())}")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, metrics_path in curves.items():
        records = [r for r in read_metrics(metrics_path) if "loss" in r]
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.5, label=label or None)
    if any(curves):
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    try:
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_path
