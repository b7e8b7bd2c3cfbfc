"""Sequence packing with document boundaries (best-fit decreasing).

Layout of one packed row (R = seq_len + 1 tokens; inputs = row[:-1], targets = row[1:]):

    [BOS a a a a][BOS b b][BOS c c c c c][pad pad pad]
     0   1 2 3 4  0   1 2  0   1 2 3 4 5  0   1   2     <- position_ids: restart at 0 at every document start

- Every document starts with BOS (prepended unless the document already starts with it). position_ids == 0
  marks a document start; the model's attention and RoPE use that to keep documents apart.
- The target of a document's last token would be the next document's BOS: it is -100, so nothing is learned
  across a boundary. The padding tail is its own "document" (positions from 0) with every target -100.
- Loss masks (SFT): a target is kept only where the target token's mask is 1 (assistant tokens).
- A document longer than R is split into chunks of at most R tokens; every chunk after the first gets its
  own BOS (so chunks hold R-1 new tokens) and is packed as an independent document. The token that starts a
  new chunk is not predicted from the previous chunk.
- Placement is best-fit decreasing: pieces sorted longest first (stable), each goes into the open row whose
  free room is the smallest that still fits, else a new row. Free rooms live in a Fenwick tree over
  1..R, so each placement is O(log R); copying tokens into rows is one slice per piece.

Shape legend: N rows, T = seq_len, R = T + 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import ConfigError

__all__ = ["IGNORE_INDEX", "PackedData", "best_fit_rows", "pack_documents"]


@dataclass
class PackedData:
    """Packed rows: int64 arrays of shape (N, T) plus packing statistics."""

    input_ids: np.ndarray
    """(N, T) token ids fed to the model."""
    targets: np.ndarray
    """(N, T) next-token ids, IGNORE_INDEX (-100) where no loss is taken."""
    position_ids: np.ndarray
    """(N, T) position within the document; 0 marks a document start."""
    seq_len: int
    """T: tokens per row seen by the model."""
    num_docs: int
    """Documents given to the packer (before splitting, after dropping empty ones)."""
    num_split_docs: int = 0
    """Documents longer than a row, split into several chunks."""
    num_dropped_docs: int = 0
    """Documents with no tokens after BOS (nothing to learn), left out."""
    num_real_tokens: int = 0
    """Document tokens (BOS included) placed in rows."""

    @property
    def num_rows(self) -> int:
        """N: number of packed rows."""
        return int(self.input_ids.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def num_slots(self) -> int:
        """Token slots in all rows: N * (seq_len + 1)."""
        return self.num_rows * (self.seq_len + 1)

    @property
    def fill(self) -> float:
        """Fraction of slots that hold document tokens (1 - padding fraction)."""
        return self.num_real_tokens / self.num_slots if self.num_slots else 0.0

    @property
    def num_target_tokens(self) -> int:
        """Targets that carry loss (not -100)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def stats_line(self) -> str:
        """One log line, e.g. 'Sequence packing: 10000 -> 5500 sequences (fill 97.1%)'."""
        return f"Sequence packing: {self.num_docs} -> {self.num_rows} sequences (fill {100 * self.fill:.1f}%)"

    def document_spans(self, row: int) -> list[tuple[int, int]]:
        """[(start, end)) input positions of each document in `row` (the padding tail counts as one)."""
        starts = np.flatnonzero(self.position_ids[row] == 0).tolist()
        ends = starts[1:] + [self.seq_len]
        return list(zip(starts, ends, strict=True))


class _FreeRoomIndex:
    """Multiset of open rows keyed by free room 1..R, with 'smallest room >= n' in O(log R) (Fenwick)."""

    def __init__(self, max_room: int):
        self.size = max_room
        self.tree = [0] * (max_room + 1)
        self.rows_by_room: list[list[int]] = [[] for _ in range(max_room + 1)]
        self.total = 0
        self.top_bit = 1 << (max_room.bit_length() - 1)

    def _update(self, room: int, delta: int) -> None:
        while room <= self.size:
            self.tree[room] += delta
            room += room & -room

    def _prefix(self, room: int) -> int:
        s = 0
        while room > 0:
            s += self.tree[room]
            room -= room & -room
        return s

    def add(self, row: int, room: int) -> None:
        self.rows_by_room[room].append(row)
        self._update(room, 1)
        self.total += 1

    def pop_best_fit(self, n: int) -> tuple[int, int] | None:
        """Remove and return (row, room) with the smallest room >= n, or None if no open row fits."""
        k = self._prefix(n - 1) + 1  # rank of the first entry with room >= n
        if k > self.total:
            return None
        # Fenwick descent: smallest room whose prefix count reaches k.
        pos, bit = 0, self.top_bit
        while bit:
            nxt = pos + bit
            if nxt <= self.size and self.tree[nxt] < k:
                pos = nxt
                k -= self.tree[nxt]
            bit >>= 1
        room = pos + 1
        row = self.rows_by_room[room].pop()
        self._update(room, -1)
        self.total -= 1
        return row, room


def _flatten(seqs: Sequence[Sequence[int]], lengths: np.ndarray) -> np.ndarray:
    """All sequences end to end as one int64 array (one pass; no per-document arrays)."""
    if len(seqs) and all(isinstance(s, np.ndarray) for s in seqs):
        return np.concatenate(seqs).astype(np.int64, copy=False)
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))


@dataclass
class _Pieces:
    """Row-sized pieces as views into the flat token array: piece i is [BOS if add_bos] + flat[src:src+n]."""

    src: np.ndarray  # start of the piece's content in the flat array
    content_len: np.ndarray  # tokens taken from the flat array
    add_bos: np.ndarray  # 1 if a BOS is prepended (then the piece is content_len + 1 long)
    num_kept: int
    num_split: int
    num_dropped: int

    @property
    def lengths(self) -> np.ndarray:
        return self.content_len + self.add_bos


def _make_pieces(flat: np.ndarray, lengths: np.ndarray, row_len: int, bos_id: int) -> _Pieces:
    """Split documents (flat tokens + lengths) into BOS-led pieces of at most row_len tokens."""
    starts = np.cumsum(lengths) - lengths
    first_tokens = np.full(len(lengths), -1, dtype=np.int64)
    nonempty = lengths > 0
    first_tokens[nonempty] = flat[starts[nonempty]]
    need_bos = ((lengths == 0) | (first_tokens != bos_id)).astype(np.int64)
    full_len = lengths + need_bos
    keep = full_len >= 2  # BOS alone teaches nothing
    fits = keep & (full_len <= row_len)
    src, content, add_bos = [starts[fits]], [lengths[fits]], [need_bos[fits]]
    split_docs = np.flatnonzero(keep & ~fits)
    for d in split_docs.tolist():
        # First chunk: the document's own start (with BOS prepended if it lacked one), row_len tokens.
        first = row_len - int(need_bos[d])
        src.append(np.array([starts[d]]))
        content.append(np.array([first]))
        add_bos.append(np.array([need_bos[d]]))
        # Later chunks: a fresh BOS + up to row_len - 1 continuation tokens each.
        chunk_starts = np.arange(starts[d] + first, starts[d] + lengths[d], row_len - 1, dtype=np.int64)
        src.append(chunk_starts)
        content.append(np.minimum(row_len - 1, starts[d] + lengths[d] - chunk_starts))
        add_bos.append(np.ones(len(chunk_starts), dtype=np.int64))
    return _Pieces(
        src=np.concatenate(src).astype(np.int64),
        content_len=np.concatenate(content).astype(np.int64),
        add_bos=np.concatenate(add_bos).astype(np.int64),
        num_kept=int(keep.sum()),
        num_split=len(split_docs),
        num_dropped=int((~keep).sum()),
    )


def best_fit_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Assign pieces (by length, each <= row_len) to rows, best-fit decreasing; returns piece indices per row."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    index = _FreeRoomIndex(row_len)
    rows: list[list[int]] = []
    for p in order.tolist():
        n = int(lengths[p])
        found = index.pop_best_fit(n)
        if found is None:
            row, room = len(rows), row_len
            rows.append([])
        else:
            row, room = found
        rows[row].append(p)
        if room - n > 0:
            index.add(row, room - n)
    return rows


def pack_documents(
    docs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]] | None,
    seq_len: int,
    bos_id: int,
    pad_id: int | None = None,
) -> PackedData:
    """Pack token documents into (N, seq_len) rows with document boundaries; masks (1 = learn) for SFT."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer")
    if masks is not None and len(masks) != len(docs):
        raise ConfigError(f"{len(docs)} documents but {len(masks)} loss masks")
    pad_id = bos_id if pad_id is None else pad_id
    row_len = seq_len + 1
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = _flatten(docs, lengths)
    if masks is None:
        flat_mask = np.ones(len(flat), dtype=bool)
    else:
        mask_lengths = np.fromiter((len(m) for m in masks), dtype=np.int64, count=len(masks))
        bad = np.flatnonzero(mask_lengths != lengths)
        if len(bad):
            i = int(bad[0])
            raise ConfigError(f"document {i}: {lengths[i]} tokens but {mask_lengths[i]} mask values")
        flat_mask = _flatten(masks, mask_lengths) != 0
    pieces = _make_pieces(flat, lengths, row_len, bos_id)
    piece_len = pieces.lengths
    rows = best_fit_rows(piece_len.tolist(), row_len)

    num_rows = len(rows)
    tokens = np.full(num_rows * row_len, pad_id, dtype=np.int64)
    learn = np.zeros(num_rows * row_len, dtype=bool)  # token may be a target
    pos_NR = np.zeros((num_rows, row_len), dtype=np.int64)
    pos = pos_NR.reshape(-1)
    ramp = np.arange(row_len, dtype=np.int64)
    used = np.zeros(num_rows, dtype=np.int64)
    src, content_len, add_bos = pieces.src.tolist(), pieces.content_len.tolist(), pieces.add_bos.tolist()
    # Slice copies per piece (contiguous in and out) beat a fancy-index scatter over every token.
    for r, row in enumerate(rows):
        off = r * row_len
        for p in row:
            s, n, b = src[p], content_len[p], add_bos[p]
            if b:
                tokens[off] = bos_id
            tokens[off + b:off + b + n] = flat[s:s + n]
            learn[off + b:off + b + n] = flat_mask[s:s + n]
            pos[off:off + b + n] = ramp[:b + n]
            off += b + n
        used[r] = off - r * row_len
    # Padding tail: its own document with positions 0, 1, ... and nothing learned.
    cols = np.arange(row_len, dtype=np.int64)[None, :]
    pad_NR = cols >= used[:, None]
    pos_NR[pad_NR] = (cols - used[:, None])[pad_NR]
    tokens_NR = tokens.reshape(num_rows, row_len)
    learn_NR = learn.reshape(num_rows, row_len) & ~pad_NR
    # A token is a target only inside its own document: position 0 (a BOS or the padding start) never is,
    # which also makes the last token of every document predict nothing.
    learn_NR &= pos_NR != 0
    targets = np.where(learn_NR[:, 1:], tokens_NR[:, 1:], IGNORE_INDEX)
    return PackedData(
        input_ids=np.ascontiguousarray(tokens_NR[:, :-1]),
        targets=np.ascontiguousarray(targets),
        position_ids=np.ascontiguousarray(pos_NR[:, :-1]),
        seq_len=seq_len,
        num_docs=pieces.num_kept,
        num_split_docs=pieces.num_split,
        num_dropped_docs=pieces.num_dropped,
        num_real_tokens=int(piece_len.sum()),
    )
