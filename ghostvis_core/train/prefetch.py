"""Batches on the training device, the next one copied while the current step computes.

On CUDA, `DevicePrefetcher` keeps one batch in flight: when the loop takes batch k, the copy of batch k+1 from
pinned host memory is queued on a side stream at once, so the copy engine moves it while the compute stream
runs step k's forward, backward and optimizer (the host runs ahead of the GPU: nothing in the step waits for
the device). The compute stream waits on the copy's event before it uses a batch, and each tensor is marked
as used by the compute stream (record_stream) so the caching allocator does not hand its memory out again
while the step still reads it.

On the CPU there is nothing to overlap: it is the loader itself, batch for batch (no copy, no thread).

Resume: the prefetcher has taken one batch from the loader that the loop has not consumed yet, so its
`state_dict()` is the loader's position before that batch, i.e. exactly the batches the loop consumed, and a
resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch


class DevicePrefetcher:
    """Iterator of the loader's batches on `device` (dicts of tensors, and host ints such as max_seqlen that
    pass through), with the next copy in flight on CUDA."""

    def __init__(self, loader: Any, device: torch.device):
        self.loader = loader
        self.device = device
        self._overlap = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._overlap else None
        self._pending: tuple[dict[str, torch.Tensor], torch.cuda.Event, dict] | None = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._overlap:
            return next(self.loader)
        if self._pending is None:
            self._pending = self._copy_next()
        batch, ready, _ = self._pending
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(compute)
        self._pending = self._copy_next()  # batch k+1 moves while step k computes
        return batch

    def _copy_next(self) -> tuple[dict[str, torch.Tensor], torch.cuda.Event, dict]:
        position = self.loader.state_dict()
        host = next(self.loader)
        with torch.cuda.stream(self._stream):
            # pinned source: a truly asynchronous copy (a pageable one would block the host)
            batch = {k: v.pin_memory().to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in host.items()}  # fmt: skip  (max_seqlen stays a host int)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return batch, ready, position

    def state_dict(self) -> dict:
        """The loader's position after the batches the loop consumed (not after the one in flight)."""
        if self._pending is not None:
            return dict(self._pending[2])
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(); a batch in flight is dropped and fetched again from there."""
        self._pending = None
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        # the loader's other attributes (batch_size, steps_per_epoch, ...) read through
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)
