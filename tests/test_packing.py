"""Sequence packing: document boundaries, targets, positions, loss masks, splitting and fill."""

import re

import numpy as np
import pytest

from ghostvis_core.data.packing import IGNORE_INDEX, PackedData, best_fit_rows, pack_documents
from ghostvis_core.errors import ConfigError

BOS, PAD = 0, 1


def _random_docs(rng, num, max_len, low=2, high=50):
    return [rng.integers(low, high, size=int(rng.integers(1, max_len + 1))).tolist() for _ in range(num)]


def _expected_pieces(doc, row_len):
    """The pieces the packer must produce for one document (BOS-led, at most row_len tokens)."""
    ids = doc if doc and doc[0] == BOS else [BOS] + list(doc)
    if len(ids) < 2:
        return []
    if len(ids) <= row_len:
        return [tuple(ids)]
    pieces = [tuple(ids[:row_len])]
    rest = ids[row_len:]
    pieces += [tuple([BOS] + rest[i:i + row_len - 1]) for i in range(0, len(rest), row_len - 1)]
    return pieces


def _reconstruct(packed: PackedData):
    """Documents read back from rows (text packing: every in-document target is kept)."""
    docs = []
    for r in range(packed.num_rows):
        spans = packed.document_spans(r)
        for k, (a, b) in enumerate(spans):
            tokens = packed.input_ids[r, a:b].tolist()
            if tokens[0] == PAD:
                assert all(t == PAD for t in tokens) and k == len(spans) - 1
                continue
            if b == packed.seq_len and packed.targets[r, b - 1] != IGNORE_INDEX:
                tokens.append(int(packed.targets[r, b - 1]))  # last slot of the row is only a target
            docs.append(tuple(tokens))
    return docs


def _check_invariants(packed: PackedData, masks_apply=False):
    T = packed.seq_len
    ids, tg, pos = packed.input_ids, packed.targets, packed.position_ids
    assert ids.dtype == tg.dtype == pos.dtype == np.int64
    assert ids.shape == tg.shape == pos.shape == (packed.num_rows, T)
    # Positions restart at 0 exactly at every BOS (or padding start) and count up by one inside a document.
    starts = pos == 0
    assert np.all(starts[:, 0])
    assert np.all(np.isin(ids[starts], [BOS, PAD]))
    assert np.all(pos[ids == BOS] == 0)
    inside = ~starts[:, 1:]
    assert np.all((pos[:, 1:] - pos[:, :-1])[inside] == 1)
    # No target crosses into the next document; targets inside a document are the next input token.
    assert np.all(tg[:, :-1][starts[:, 1:]] == IGNORE_INDEX)
    kept = tg[:, :-1] != IGNORE_INDEX
    assert np.all(tg[:, :-1][kept] == ids[:, 1:][kept])
    if not masks_apply:
        assert np.all(kept | starts[:, 1:] | (ids[:, 1:] == PAD))
    assert not np.any(np.isin(tg, [BOS, PAD]))


@pytest.mark.parametrize("seq_len", [16, 63, 128])
def test_every_document_appears_once_in_order(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = _random_docs(rng, 400, max_len=3 * seq_len)  # many longer than a row: they get split
    packed = pack_documents(docs, None, seq_len, BOS, pad_id=PAD)
    _check_invariants(packed)
    expected = sorted(p for d in docs for p in _expected_pieces(d, seq_len + 1))
    assert sorted(_reconstruct(packed)) == expected
    assert packed.num_docs == len(docs)
    assert packed.num_split_docs == sum(len(d) + 1 > seq_len + 1 for d in docs) > 0
    assert packed.num_real_tokens == sum(len(p) for p in expected)
    assert packed.fill == pytest.approx(packed.num_real_tokens / (packed.num_rows * (seq_len + 1)))


def test_split_long_document_exact_layout():
    doc = list(range(2, 22))  # 20 tokens + BOS = 21 > row_len 8
    packed = pack_documents([doc], None, 7, BOS, pad_id=PAD)
    rows = sorted(_reconstruct(packed), key=lambda p: p[1])
    assert rows == [(BOS, 2, 3, 4, 5, 6, 7, 8), (BOS, 9, 10, 11, 12, 13, 14, 15),
                    (BOS, 16, 17, 18, 19, 20, 21)]
    assert packed.num_split_docs == 1 and packed.num_docs == 1


def test_small_exact_rows():
    packed = pack_documents([[5, 6, 7], [8, 9]], None, 8, BOS, pad_id=PAD)
    assert packed.num_rows == 1
    # best-fit decreasing: the longer piece first
    assert packed.input_ids[0].tolist() == [BOS, 5, 6, 7, BOS, 8, 9, PAD]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert packed.targets[0].tolist() == [5, 6, 7, -100, 8, 9, -100, -100]
    assert packed.stats_line() == "Sequence packing: 2 -> 1 sequences (fill 77.8%)"
    assert packed.document_spans(0) == [(0, 4), (4, 7), (7, 8)]


def test_document_already_starting_with_bos_is_not_doubled_and_empty_dropped():
    packed = pack_documents([[BOS, 5, 6], [], [BOS], [7]], None, 8, BOS, pad_id=PAD)
    assert sorted(_reconstruct(packed)) == [(BOS, 5, 6), (BOS, 7)]
    assert packed.num_dropped_docs == 2 and packed.num_docs == 2


def test_loss_masks_keep_only_masked_targets():
    docs = [[BOS, 10, 11, 12, 13, 14], [BOS, 20, 21, 22]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0]]  # second doc fully masked
    packed = pack_documents(docs, masks, 16, BOS, pad_id=PAD)
    _check_invariants(packed, masks_apply=True)
    kept = packed.targets[packed.targets != IGNORE_INDEX].tolist()
    assert sorted(kept) == [12, 13, 14]
    fully_masked = pack_documents([[BOS, 1, 2]], [[0, 0, 0]], 4, BOS, pad_id=PAD)
    assert np.all(fully_masked.targets == IGNORE_INDEX) and fully_masked.num_target_tokens == 0


def test_masks_follow_split_chunks():
    doc = list(range(2, 30))
    mask = [i % 2 for i in range(len(doc))]
    packed = pack_documents([doc], [mask], 9, BOS, pad_id=PAD)
    _check_invariants(packed, masks_apply=True)
    learned = dict(zip(doc, mask, strict=True))
    kept = packed.targets[packed.targets != IGNORE_INDEX].tolist()
    assert all(learned[t] == 1 for t in kept)
    # Every masked-in token is learned once; a chunk's first token is predicted from the chunk's own BOS.
    assert sorted(kept) == sorted(t for t, m in learned.items() if m)


def test_best_fit_beats_next_fit_and_fills_rows():
    rng = np.random.default_rng(0)
    row_len = 257
    lengths = rng.integers(2, row_len // 2, size=3000).tolist()
    rows = best_fit_rows(lengths, row_len)
    assert sorted(p for row in rows for p in row) == list(range(len(lengths)))
    assert all(sum(lengths[p] for p in row) <= row_len for row in rows)
    # next-fit in the given order (the naive packer)
    next_fit, room = 0, 0
    for n in lengths:
        if n > room:
            next_fit, room = next_fit + 1, row_len
        room -= n
    fill = sum(lengths) / (len(rows) * row_len)
    print(f"best-fit rows {len(rows)} vs next-fit {next_fit}, fill {fill:.4f}")
    assert len(rows) < next_fit
    assert fill > 0.99


def test_fill_on_random_documents():
    rng = np.random.default_rng(1)
    docs = _random_docs(rng, 5000, max_len=300)
    packed = pack_documents(docs, None, 256, BOS, pad_id=PAD)
    assert packed.fill > 0.97
    assert re.fullmatch(r"Sequence packing: 5000 -> \d+ sequences \(fill \d+\.\d%\)", packed.stats_line())
    _check_invariants(packed)


def test_numpy_documents_and_default_pad():
    docs = [np.array([5, 6, 7]), np.array([8])]
    packed = pack_documents(docs, None, 6, BOS)
    assert packed.input_ids[0].tolist() == [BOS, 5, 6, 7, BOS, 8]


def test_bad_arguments():
    with pytest.raises(ConfigError, match="seq_len"):
        pack_documents([[1]], None, 0, BOS)
    with pytest.raises(ConfigError, match="loss masks"):
        pack_documents([[1]], [], 8, BOS)
    with pytest.raises(ConfigError, match="document 0: 2 tokens but 1 mask"):
        pack_documents([[1, 2]], [[1]], 8, BOS)


def test_empty_input_gives_no_rows():
    packed = pack_documents([], None, 8, BOS)
    assert packed.num_rows == 0 and packed.fill == 0.0 and packed.input_ids.shape == (0, 8)
