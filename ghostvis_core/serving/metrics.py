"""Server counters for GET /metrics and the one access-log line per request."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ghostvis_core.log import get_logger

WINDOW_S = 10.0
"""tokens_per_s is measured over the last WINDOW_S seconds."""


@dataclass
class RequestRecord:
    """What the access log says about one request."""

    id: str
    route: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    stream: bool = False
    finish_reason: str | None = None


class ServerMetrics:
    """Request counts by outcome, in-flight requests, and a sliding window of generated tokens."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.t_start = time.perf_counter()
        self.requests_total = 0
        self.by_status: dict[int, int] = {}
        self.in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._samples: deque[tuple[float, int]] = deque()

    def _sample(self) -> tuple[float, int]:
        now, generated = time.perf_counter(), self.scheduler.generated_tokens
        self._samples.append((now, generated))
        while len(self._samples) > 2 and self._samples[1][0] < now - WINDOW_S:
            self._samples.popleft()
        return now, generated

    def record(self, r: RequestRecord) -> None:
        """Count a finished request and write its access-log line."""
        self.requests_total += 1
        self.by_status[r.status] = self.by_status.get(r.status, 0) + 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self._sample()
        ttft = "-" if r.ttft_s is None else f"{1e3 * r.ttft_s:.1f}ms"
        get_logger().info(
            f"{r.id} {r.route} {r.status} in={r.prompt_tokens} out={r.completion_tokens} ttft={ttft} "
            f"total={1e3 * r.total_s:.1f}ms{' stream' if r.stream else ''}"
            + (f" finish={r.finish_reason}" if r.finish_reason else "")
        )

    def snapshot(self) -> dict:
        s = self.scheduler
        now, generated = self._sample()
        t0, g0 = self._samples[0]
        steps = s.decode_steps
        return {
            "uptime_s": now - self.t_start,
            "requests_total": self.requests_total,
            "requests_by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "requests_in_flight": self.in_flight,
            "queue_depth": s.queue_depth,
            "active_rows": s.active_rows,
            "batch_size": s.batch_size,
            "batch_occupancy": s.active_rows / s.batch_size,
            "mean_batch_occupancy": s.row_steps / (steps * s.batch_size) if steps else 0.0,
            "requests_finished": s.num_finished,
            "requests_cancelled": s.num_cancelled,
            "requests_failed": s.num_failed,
            "prompt_tokens_total": self.prompt_tokens,
            "completion_tokens_total": self.completion_tokens,
            "generated_tokens_total": generated,
            "tokens_per_s": (generated - g0) / (now - t0) if now > t0 else 0.0,
            "decode_steps_total": steps,
            "scheduler": s.timing(),
        }
