"""Deterministic, shardable, resumable batches over packed rows.

The rule (every rank computes the same global order, then takes its own block):

1. Epoch e visits all N rows in the order `permutation(N)` of `numpy.random.default_rng(seed + e)`
   (identity order when shuffle=False). Epochs are laid end to end into one infinite row stream.
2. Global batch k is the next G = batch_size * world_size rows of that stream; a batch may straddle two
   epochs, so no row is dropped and a dataset smaller than G still works.
3. Rank r takes the contiguous block [r * batch_size, (r + 1) * batch_size) of each global batch.

Hence one process with batch 2B yields exactly torch.cat([rank0_batch, rank1_batch]) of two processes with
batch B, step for step. `state_dict()` stores the global position (epoch, row offset in that epoch, seed),
which does not depend on the rank, so a resumed loader continues with exactly the batches an uninterrupted
one would produce (also after changing world_size, as long as batch_size * world_size is what it was).
"""

from __future__ import annotations

import numpy as np
import torch

from ghostvis_core.attention import cu_seqlens_from_positions
from ghostvis_core.data.packing import PackedData
from ghostvis_core.errors import ConfigError, DataError


def document_bounds(position_ids_BT: torch.Tensor) -> dict:
    """{"cu_seqlens": int32 (num_docs + 1,), "max_seqlen": int} of a packed batch, computed here on the host
    from its position_ids (the trainer hands them to attention: on the device they would cost a sync)."""
    cu, longest = cu_seqlens_from_positions(position_ids_BT)
    return {"cu_seqlens": cu, "max_seqlen": longest}


class PackedBatchLoader:
    """Infinite iterator of {"input_ids", "targets", "position_ids"} (B, T) int64 tensors for one rank, with
    their document_bounds ("cu_seqlens", "max_seqlen")."""

    def __init__(
        self,
        packed: PackedData,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if packed.num_rows == 0:
            raise DataError("the packed dataset has no rows: the data source produced no usable documents")
        self.packed = packed
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # offset in the current epoch's order of the next global batch's first row
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def global_batch_size(self) -> int:
        """Rows consumed per step over all ranks: batch_size * world_size."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        """Global batches per pass over the data (fractional: batches straddle epochs)."""
        return self.packed.num_rows / self.global_batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.packed.num_rows
            self._order = (np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def _take_global_rows(self) -> np.ndarray:
        """The next G row indices of the infinite stream; advances (epoch, position)."""
        need, chunks = self.global_batch_size, []
        while need:
            order = self._epoch_order(self.epoch)
            take = order[self.position:self.position + need]
            chunks.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(chunks)

    def __iter__(self) -> PackedBatchLoader:
        return self

    def next_rows(self) -> np.ndarray:
        """This rank's row indices of the next batch (what `__next__` yields the tokens of); advances."""
        return self._take_global_rows()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self.next_rows()
        p = self.packed
        positions = torch.from_numpy(p.position_ids[rows])
        return {
            "input_ids": torch.from_numpy(p.input_ids[rows]),
            "targets": torch.from_numpy(p.targets[rows]),
            "position_ids": positions,
            **document_bounds(positions),
        }

    def state_dict(self) -> dict[str, int]:
        """Resumable position: {"epoch", "position", "seed"} (plain ints, JSON-safe)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next batch is the one an uninterrupted loader would yield."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise DataError(f"loader state lacks {sorted(missing)}; got keys {sorted(state)}")
        if not 0 <= int(state["position"]) < max(self.packed.num_rows, 1):
            raise DataError(
                f"loader state position {state['position']} is outside this dataset's {self.packed.num_rows} "
                "rows: the data changed since the checkpoint; resume with the same data and seq_len"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._order_epoch = None
