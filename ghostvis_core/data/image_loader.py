"""Batches of packed image-chat rows with their decoded pixels, over PackedBatchLoader's row order.

Order and sharding are PackedBatchLoader's (composed, not copied): this loader holds one as the record of
what the consumer has taken, and `state_dict()` is that one's, so a resume continues on the same rows.
A second PackedBatchLoader, started from the same state, runs ahead in the main process as the DataLoader's
sampler and hands each batch's row indices to the workers; a batch's pixels are a pure function of its
row indices (Pillow decode, resize, normalise: `load_image`), so the batches are the same bitwise whatever
num_workers is, and torch's DataLoader returns them in sampler order.

Workers receive only the image table (paths and per-row offsets), never the token arrays, so starting them
costs little even when the start method pickles the dataset; tokens are sliced in the main process. With
pin_memory the DataLoader's pin thread pins the pixels and the tokens are pinned here, so the trainer's
`.to(device, non_blocking=True)` copies overlap compute.

Shape legend: B rows per batch, T = seq_len, N images in the batch, C channels, S image side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ghostvis_core.data.image_dataset import ImageTable, PackedImageData
from ghostvis_core.data.images import load_image
from ghostvis_core.data.loader import PackedBatchLoader, document_bounds
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.vision_config import VisionConfig

PREFETCH_BATCHES = 4
"""Batches each worker decodes ahead of the consumer (DataLoader's prefetch_factor)."""


class _PixelDecoder(Dataset):
    """Item = one batch: its row indices -> (N, C, S, S) pixels of the rows' images in row order."""

    def __init__(self, table: ImageTable, vision: VisionConfig):
        self.table = table
        self.image_size, self.mean, self.std = vision.image_size, vision.image_mean, vision.image_std

    def __len__(self) -> int:
        return len(self.table.row_offsets) - 1

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """(N, C, S, S) float32 pixels of the images of `rows`, rows in order, each row's images in order."""
        sources = [src for r in rows.tolist() for src in self.table.row_sources(r)]
        out_NCSS = torch.empty(len(sources), 3, self.image_size, self.image_size)
        decoded: dict = {}  # QA rows repeat an image: decode each file once per batch
        for i, (where, path) in enumerate(sources):
            if path not in decoded:
                try:
                    decoded[path] = load_image(path, self.image_size, self.mean, self.std)
                except DataError as e:
                    raise DataError(f"{where}: image {e}") from e
            out_NCSS[i] = decoded[path]
        return out_NCSS

    def __getitem__(self, rows: np.ndarray) -> dict:
        try:
            return {"rows": torch.from_numpy(rows), "pixel_values": self.decode(rows)}
        except DataError as e:
            # torch re-raises a worker's exception with the worker's traceback pasted into its message; the
            # consumer raises this message as it is, so the user sees one line naming the record and file.
            return {"rows": torch.from_numpy(rows), "error": str(e)}


class _RowStream:
    """The sampler: this rank's row indices, batch after batch, from a given loader state onwards."""

    def __init__(self, consumed: PackedBatchLoader):
        o = consumed
        self.ahead = PackedBatchLoader(o.packed, o.batch_size, o.rank, o.world_size, o.seed, o.shuffle)
        self.ahead.load_state_dict(o.state_dict())

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.ahead.next_rows()


class ImageBatchLoader:
    """Infinite iterator of {"input_ids", "targets", "position_ids" (B, T) int64, "pixel_values" (N, C, S, S)
    float32, "num_images" (B,) int64} for one rank; `wait_seconds` is the time `__next__` spent waiting."""

    def __init__(
        self,
        data: PackedImageData,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        vision: VisionConfig,
        num_workers: int = 2,
        pin_memory: bool | None = None,
    ):
        if not isinstance(data, PackedImageData):
            raise ConfigError(f"ImageBatchLoader needs PackedImageData (build_image_chat_dataset), got "
                              f"{type(data).__name__}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers={num_workers!r} must be an integer >= 0 (0 decodes in this process)")
        if vision.num_image_tokens != data.num_image_tokens:
            raise ConfigError(f"the data was packed with {data.num_image_tokens} tokens per image but the tower "
                              f"gives {vision.num_image_tokens}; build the dataset with the same vision config")
        self.data = data
        self.vision = vision
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.wait_seconds = 0.0
        """Seconds `__next__` waited for batches (decoding not hidden behind compute, worker start-up)."""
        self._consumed = PackedBatchLoader(data, batch_size, rank, world_size, seed)
        self._batches: Iterator[dict] | None = None

    @property
    def batch_size(self) -> int:
        """Rows per batch on this rank."""
        return self._consumed.batch_size

    @property
    def global_batch_size(self) -> int:
        """Rows consumed per step over all ranks: batch_size * world_size."""
        return self._consumed.global_batch_size

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data (fractional: batches straddle epochs)."""
        return self._consumed.steps_per_epoch

    def _start(self) -> Iterator[dict]:
        workers = self.num_workers
        loader = DataLoader(
            _PixelDecoder(self.data.images, self.vision),
            batch_size=None,  # the sampler yields whole batches of rows
            sampler=_RowStream(self._consumed),
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=PREFETCH_BATCHES if workers else None,
        )
        return iter(loader)

    def __iter__(self) -> ImageBatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._batches is None:
            self._batches = self._start()
        item = next(self._batches)
        self.wait_seconds += time.perf_counter() - t0
        if "error" in item:
            self.close()
            raise DataError(item["error"])
        rows = self._consumed.next_rows()
        assert np.array_equal(item["rows"].numpy(), rows), "the sampler runs the consumer's row order"
        p = self.data
        positions = torch.from_numpy(p.position_ids[rows])
        batch = {
            "input_ids": torch.from_numpy(p.input_ids[rows]),
            "targets": torch.from_numpy(p.targets[rows]),
            "position_ids": positions,
            "num_images": torch.from_numpy(p.images.num_images_per_row(rows)),
            **document_bounds(positions),
        }
        if self.pin_memory:  # the DataLoader's pin thread already pinned the pixels; max_seqlen is an int
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["pixel_values"] = item["pixel_values"]
        return batch

    def close(self) -> None:
        """Stop the workers (they start again at the next batch, from the consumed position)."""
        # Dropping the last reference shuts the DataLoader iterator's workers down (its __del__).
        self._batches = None

    def state_dict(self) -> dict[str, int]:
        """Resumable position of the batches consumed so far: PackedBatchLoader's {"epoch", "position", "seed"}."""
        return self._consumed.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; batches decoded ahead from the old position are discarded."""
        self._consumed.load_state_dict(state)
        self.close()
