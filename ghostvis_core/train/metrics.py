"""Step metrics: tok/s, MFU, peak memory, ETA; metrics.jsonl in the run folder and a Rich progress line.

MFU = tok/s x flops_per_token / (peak bf16 FLOP/s per card x cards), with flops_per_token from the model
(6 N_non-embedding + 12 L d T, nanochat's formula); a VLM adds its tower's flops per image x images per token. CPUs have no meaningful peak, so MFU there is "n/a".
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ghostvis_core.atomic import write_text_atomic
from ghostvis_core.hardware_limits import peak_bf16_flops


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak FLOP/s (hardware_limits.PEAK_BF16_FLOPS), or None (CPU, unknown card)."""
    if device.type != "cuda":
        return None
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def compute_mfu(tok_per_s: float, flops_per_token: float, world_size: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] against the peak of all cards, or None without a known peak."""
    if peak is None or peak <= 0:
        return None
    return tok_per_s * flops_per_token / (peak * world_size)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory on this rank, or peak RSS of the process on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def format_eta(seconds: float | None) -> str:
    """'1h02m', '3m05s', '12s', or '?' while unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _rates(record: dict[str, Any]) -> str:
    """" (matrix 3e-03, head 3e-03)": the real rate of each optimizer group, when the record has them."""
    lrs = record.get("lr")
    if not lrs:
        return ""
    return " (" + ", ".join(f"{name} {lr:.2e}" for name, lr in lrs.items()) + ")"


def format_step_line(record: dict[str, Any], num_steps: int) -> str:
    """One Rich-markup progress line for a metrics record."""
    step = record["step"]
    width = len(str(num_steps))
    mfu = record.get("mfu")
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    mem_label = "mem" if record.get("mem_kind") == "cuda" else "rss"
    return (
        f"[bold]step {step:>{width}}/{num_steps}[/bold] ({100 * step / num_steps:5.1f}%) | "
        f"loss [cyan]{record['loss']:.4f}[/cyan] | lr x{record['lr_mult']:.3f}{_rates(record)} | dt {record['dt_ms']:.0f}ms | "
        f"tok/s {record['tok_per_s']:,.0f} | "
        + (f"img/s {record['images_per_s']:,.1f} | " if "images_per_s" in record else "")
        + f"mfu {mfu_text} | {mem_label} {record['peak_mem_gib']:.2f}GiB | "
        f"eta {format_eta(record.get('eta_s'))}"
    )


class ProgressPrinter:
    """Rank-0 progress lines through Rich: styled on a terminal, plain text (no wrapping) in logs and pipes."""

    def __init__(self, num_steps: int, enabled: bool = True):
        self.num_steps = num_steps
        self.enabled = enabled
        # stderr, like the logger, so progress and log lines interleave in order; soft_wrap keeps one line
        # per step when stdout/stderr is a file (Rich would otherwise wrap at 80 columns)
        self.console = Console(stderr=True, soft_wrap=True, highlight=False)

    def step(self, record: dict[str, Any]) -> None:
        """Print the line for one logged step."""
        if self.enabled:
            self.console.print(format_step_line(record, self.num_steps))


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per logged step; each record also goes to the run's logging
    backends (log_backends.LogBackends: TensorBoard, W&B), when it has any."""

    def __init__(self, path: Path, backends: Any = None):
        self.path = Path(path)
        self.backends = backends

    def truncate_after(self, step: int) -> int:
        """Drop lines with step > `step` (a resume point) so the file stays one consistent history (the
        backends purge their events after it too)."""
        if self.backends is not None:
            self.backends.start_step = step
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # a line cut by a crash mid-write: it belongs to a step after the last checkpoint
                dropped += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (flushed, so a killed run keeps every line it logged)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.backends is not None:
            self.backends.log(record)

    def close(self) -> None:
        """Close the logging backends (metrics.jsonl itself is closed after every line)."""
        if self.backends is not None:
            self.backends.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (skips a torn last line)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
