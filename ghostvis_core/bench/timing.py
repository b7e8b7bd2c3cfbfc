"""Shared GPU timing helpers: median of CUDA-event timings, and the device-to-device copy ceiling.

Every timed call is preceded by a write over a buffer larger than L2, so no call finds its inputs left in
cache by the previous one (the effect rotating input sets would have, for any input size), and by a GPU spin
that lets the host enqueue the whole call first (see `cuda_median_ms`).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ghostvis_core.errors import GhostVisError

# Bytes written between timed calls to evict L2 (H100: 50 MiB; 256 MiB leaves margin for larger caches).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (a CUDA GPU; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def require_cuda(what: str) -> torch.device:
    """The current CUDA device, or a GhostVisError saying `what` needs a CUDA GPU."""
    if not torch.cuda.is_available():
        raise GhostVisError(
            f"{what} needs a CUDA GPU and none is visible to torch {torch.__version__} "
            "(run it on a GPU machine; `ghostvis doctor` shows what torch sees)."
        )
    return torch.device("cuda", torch.cuda.current_device())


_CYCLES_PER_MS: list[float] = []


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles per millisecond of `torch.cuda._sleep`, measured once per process."""
    if not _CYCLES_PER_MS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS.append(1_000_000 / start.elapsed_time(end))
    return _CYCLES_PER_MS[0]


def cuda_median_ms(
    fn: Callable[[], object], warmup: int = 5, iters: int = 30, flush_l2: bool = True
) -> float:
    """Median GPU milliseconds of `fn()` over `iters` calls, each bracketed by CUDA events (after warm-up).

    Before each timed call the GPU is kept busy (an L2 flush, then a spin of about twice the host time one call
    takes to enqueue), so the whole call is queued before the GPU reaches the start event: the events then
    time the GPU work and the gaps between its kernels, not Python and launch overhead (which a training step
    overlaps by running ahead of the GPU).
    """
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    host_s = []
    for _ in range(warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host_s.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    host_ms = 1e3 * sorted(host_s[1:] or host_s)[len(host_s[1:] or host_s) // 2]
    spin_cycles = int(min(max(0.2, 2.0 * host_ms), 50.0) * _sleep_cycles_per_ms())
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        torch.cuda._sleep(spin_cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def gb_per_s(num_bytes: int, ms: float) -> float:
    """Bytes moved over milliseconds, in GB/s (1e9 bytes)."""
    return num_bytes / (ms * 1e-3) / 1e9


@dataclass(frozen=True)
class CopyBandwidth:
    """A device-to-device copy measured in the same process: the practical memory ceiling."""

    num_bytes: int
    """Bytes moved per copy: bytes read plus bytes written."""
    ms: float
    """Median milliseconds per copy."""

    @property
    def gb_s(self) -> float:
        """Achieved GB/s (read + write)."""
        return gb_per_s(self.num_bytes, self.ms)


def copy_bandwidth(num_elements: int = 1 << 28, dtype: torch.dtype = torch.bfloat16) -> CopyBandwidth:
    """Median `dst.copy_(src)` bandwidth on the current CUDA device (default: 512 MiB of bf16 each way)."""
    src = torch.randn(num_elements, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src))
    return CopyBandwidth(num_bytes=2 * src.numel() * src.element_size(), ms=ms)


class CudaSpan:
    """GPU milliseconds between two points of a stream (CUDA events; read `ms` after a synchronize).

    For spans that cuda_median_ms cannot bracket: a run of consecutive training steps timed as one, or the
    optimizer step inside each of them.
    """

    def __init__(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        """Record the start event on the current stream."""
        self._start.record()

    def stop(self) -> None:
        """Record the end event on the current stream."""
        self._end.record()

    @property
    def ms(self) -> float:
        """Elapsed GPU milliseconds (both events must have completed)."""
        return self._start.elapsed_time(self._end)


def kernel_category(name: str) -> str:
    """A CUDA kernel's kind from its name: gemm_fp8, gemm (bf16/fp32 cuBLAS/CUTLASS), attention, triton (inductor's
    fused elementwise and reductions, our Triton kernels), or other (aten elementwise, foreach, copies)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "cublas", "sm90_", "sm80_")):
        return "gemm_fp8" if any(k in n for k in ("e4m3", "e5m2", "f8", "fp8")) else "gemm"
    if n.startswith("triton") or "_triton_" in n or n.startswith("_"):
        return "triton"
    return "other"


def kernel_census(fn: Callable[[], object], runs: int, top: int = 12) -> dict:
    """Profile `runs` calls of `fn` (CUDA): kernels and GPU ms per call, GPU ms per kernel_category per call, and
    the `top` kernels by GPU time (name, ms per call, launches per call)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    categories: dict[str, float] = {}
    for e in events:
        kind = kernel_category(e.key)
        categories[kind] = categories.get(kind, 0.0) + e.device_time_total / runs / 1e3
    largest = sorted(events, key=lambda e: -e.device_time_total)[:top]
    return {
        "kernels_per_run": sum(e.count for e in events) / runs,
        "gpu_ms_per_run": sum(e.device_time_total for e in events) / runs / 1e3,
        "gpu_ms_by_category": {k: round(v, 3) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "largest": [(e.key[:90], round(e.device_time_total / runs / 1e3, 4), e.count / runs) for e in largest],
    }
