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
- Sticky tokens (`pack_with_layout(..., sticky=)`, the expanded image tokens of image chats): a piece never
  ends on one. A split point moves back to before the run, so an image's tokens are never cut, and its
  last token never lands in a row's final slot, which is a target only. A document that cannot be split
  so, or that ends on a sticky token, raises `UnsplittableDocumentError` naming the document.

Shape legend: N rows, T = seq_len, R = T + 1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import ConfigError, DataError

__all__ = [
    "IGNORE_INDEX", "PackLayout", "PackedData", "UnsplittableDocumentError", "best_fit_rows", "pack_documents",
    "pack_with_layout",
]


class UnsplittableDocumentError(DataError):
    """A document with sticky tokens that no split into rows can keep whole; `doc` is its index."""

    def __init__(self, doc: int, message: str):
        super().__init__(f"document {doc}: {message}")
        self.doc = doc
        self.reason = message


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


def _sticky_chunks(
    sticky: np.ndarray, start: int, length: int, row_len: int, need_bos: int, doc: int
) -> tuple[list[int], list[int], list[int]]:
    """(src, content_len, add_bos) of one long document's chunks when no chunk may end on a sticky token."""
    src, content, add_bos = [], [], []
    s, stop, bos = start, start + length, need_bos
    while True:
        end = min(s + row_len - bos, stop)
        if end < stop:
            while end > s and sticky[end - 1]:
                end -= 1  # back off to before the sticky run: the run moves whole to the next chunk
            if end == s:
                # s starts a run (a chunk never ends on a sticky token) and the document ends off one.
                run = int(np.argmin(sticky[s:stop]))
                raise UnsplittableDocumentError(doc, (
                    f"{length} tokens cannot be split into rows of {row_len} tokens: the run of {run} image "
                    f"tokens at token {s - start} does not fit in one row with its BOS"
                ))
        src.append(s)
        content.append(end - s)
        add_bos.append(bos)
        if end == stop:
            return src, content, add_bos
        s, bos = end, 1


def _make_pieces(
    flat: np.ndarray, lengths: np.ndarray, row_len: int, bos_id: int, sticky: np.ndarray | None = None
) -> _Pieces:
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
    if sticky is not None:
        kept = np.flatnonzero(keep)
        ends_sticky = kept[sticky[starts[kept] + lengths[kept] - 1]]
        if len(ends_sticky):
            raise UnsplittableDocumentError(int(ends_sticky[0]), "ends on an image token; end it with text")
        # Prefix sums find the split documents holding any sticky token without a pass per document.
        sticky_before = np.concatenate([[0], np.cumsum(sticky, dtype=np.int64)])
        has_sticky = sticky_before[starts + lengths] > sticky_before[starts]
    for d in split_docs.tolist():
        if sticky is not None and has_sticky[d]:
            chunks = _sticky_chunks(sticky, int(starts[d]), int(lengths[d]), row_len, int(need_bos[d]), d)
            for out, values in zip((src, content, add_bos), chunks, strict=True):
                out.append(np.asarray(values, dtype=np.int64))
            continue
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


@dataclass(frozen=True)
class PackLayout:
    """Where each packed row's tokens came from, for data that travels beside the tokens (images)."""

    row_pieces: list[list[int]]
    """Piece indices of each row, in the order they sit in the row."""
    src: np.ndarray
    """(num_pieces,) start of each piece's content in the documents laid end to end."""
    content_len: np.ndarray
    """(num_pieces,) document tokens in each piece (a prepended BOS not counted)."""


def pack_documents(
    docs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]] | None,
    seq_len: int,
    bos_id: int,
    pad_id: int | None = None,
) -> PackedData:
    """Pack token documents into (N, seq_len) rows with document boundaries; masks (1 = learn) for SFT."""
    return pack_with_layout(docs, masks, seq_len, bos_id, pad_id)[0]


def pack_with_layout(
    docs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]] | None,
    seq_len: int,
    bos_id: int,
    pad_id: int | None = None,
    *,
    sticky: Sequence[Sequence[int]] | None = None,
) -> tuple[PackedData, PackLayout]:
    """`pack_documents` plus the layout; sticky (per document, 1 = a piece may not end here) keeps runs whole."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} must be a positive integer")
    pad_id = bos_id if pad_id is None else pad_id
    row_len = seq_len + 1
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    flat = _flatten(docs, lengths)
    flat_mask = _flat_flags(masks, lengths, "loss masks", "mask values", default=True)
    flat_sticky = None if sticky is None else _flat_flags(sticky, lengths, "sticky flags", "sticky flags")
    pieces = _make_pieces(flat, lengths, row_len, bos_id, flat_sticky)
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
    packed = PackedData(
        input_ids=np.ascontiguousarray(tokens_NR[:, :-1]),
        targets=np.ascontiguousarray(targets),
        position_ids=np.ascontiguousarray(pos_NR[:, :-1]),
        seq_len=seq_len,
        num_docs=pieces.num_kept,
        num_split_docs=pieces.num_split,
        num_dropped_docs=pieces.num_dropped,
        num_real_tokens=int(piece_len.sum()),
    )
    return packed, PackLayout(rows, pieces.src, pieces.content_len)


def _flat_flags(
    flags: Sequence[Sequence[int]] | None, lengths: np.ndarray, what: str, unit: str, default: bool = False
) -> np.ndarray:
    """Per-document 0/1 flags laid end to end as one bool array (all `default` when flags is None)."""
    if flags is None:
        return np.full(int(lengths.sum()), default, dtype=bool)
    if len(flags) != len(lengths):
        raise ConfigError(f"{len(lengths)} documents but {len(flags)} {what}")
    flag_lengths = np.fromiter((len(m) for m in flags), dtype=np.int64, count=len(flags))
    bad = np.flatnonzero(flag_lengths != lengths)
    if len(bad):
        i = int(bad[0])
        raise ConfigError(f"document {i}: {lengths[i]} tokens but {flag_lengths[i]} {unit}")
    return _flatten(flags, flag_lengths) != 0
