"""PackedBatchLoader: deterministic order, epochs, rank sharding rule, exact resume."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_batch

from ghostvis_core.data.loader import PackedBatchLoader, document_bounds
from ghostvis_core.data.packing import PackedData, pack_documents
from ghostvis_core.errors import ConfigError, DataError


def _rows(num_rows: int, seq_len: int = 4) -> PackedData:
    """Row i holds the value i everywhere, so a batch names its rows."""
    ids = np.repeat(np.arange(num_rows, dtype=np.int64)[:, None], seq_len, axis=1)
    return PackedData(input_ids=ids, targets=ids + 1000, position_ids=np.zeros_like(ids), seq_len=seq_len,
                      num_docs=num_rows, num_real_tokens=ids.size)


def _row_ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_batch_format():
    packed = pack_documents([[5, 6, 7], [8, 9]] * 10, None, 8, 0, pad_id=1)
    batch = next(PackedBatchLoader(packed, batch_size=3))
    assert set(batch) == {"input_ids", "targets", "position_ids", "cu_seqlens", "max_seqlen"}
    for k in ("input_ids", "targets", "position_ids"):
        assert batch[k].dtype == torch.int64 and batch[k].shape == (3, 8)
    # the rows' documents as flash-attn's varlen offsets, from the host tensor
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 24 and batch["max_seqlen"] == max(b - a for a, b in zip(cu, cu[1:], strict=False))


def test_each_epoch_visits_every_row_once_in_a_seeded_order():
    packed = _rows(12)
    loader = PackedBatchLoader(packed, batch_size=4, seed=5)
    epoch0 = sum((_row_ids(next(loader)) for _ in range(3)), [])
    epoch1 = sum((_row_ids(next(loader)) for _ in range(3)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 == np.random.default_rng(5).permutation(12).tolist()
    assert epoch1 == np.random.default_rng(6).permutation(12).tolist()
    assert loader.state_dict() == {"epoch": 2, "position": 0, "seed": 5}
    again = PackedBatchLoader(packed, batch_size=4, seed=5)
    assert sum((_row_ids(next(again)) for _ in range(3)), []) == epoch0
    other = PackedBatchLoader(packed, batch_size=4, seed=6)
    assert sum((_row_ids(next(other)) for _ in range(3)), []) != epoch0


def test_no_shuffle_is_in_order_and_batches_straddle_epochs():
    loader = PackedBatchLoader(_rows(5), batch_size=3, shuffle=False)
    assert [_row_ids(next(loader)) for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert loader.state_dict() == {"epoch": 1, "position": 4, "seed": 0}


def test_dataset_smaller_than_a_batch_still_iterates():
    loader = PackedBatchLoader(_rows(2), batch_size=5, shuffle=False)
    assert _row_ids(next(loader)) == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("num_rows", [7, 16])
def test_one_process_equals_concatenated_ranks(num_rows):
    """Rule: rank r takes block [r*B, (r+1)*B) of each global batch, so cat(ranks) == one process with W*B."""
    packed = _rows(num_rows)
    single = PackedBatchLoader(packed, batch_size=4, world_size=1, seed=3)
    ranks = [PackedBatchLoader(packed, batch_size=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(10):  # crosses several epoch boundaries
        one = next(single)
        parts = [next(loader) for loader in ranks]
        for key in ("input_ids", "targets", "position_ids"):
            assert torch.equal(one[key], torch.cat([p[key] for p in parts]))
        for p in parts:  # each rank's document bounds are its own rows'
            assert_same_batch(p, {**p, **document_bounds(p["position_ids"])})
        if num_rows % 4 == 0:  # batches don't straddle epochs: the ranks' rows are disjoint
            assert not set(_row_ids(parts[0])) & set(_row_ids(parts[1]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_resume_mid_epoch_gives_identical_batches():
    packed = _rows(11)
    reference = PackedBatchLoader(packed, batch_size=3, seed=9)
    expected = [next(reference) for _ in range(12)]
    first = PackedBatchLoader(packed, batch_size=3, seed=9)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint's state.json
    assert state["epoch"] == 1 and 0 < state["position"] < 11
    resumed = PackedBatchLoader(packed, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        assert_same_batch(next(resumed), want)


def test_resume_with_another_world_size_same_global_batch():
    packed = _rows(10)
    single = PackedBatchLoader(packed, batch_size=4, seed=1)
    for _ in range(3):
        next(single)
    state = single.state_dict()
    expected = next(single)
    ranks = [PackedBatchLoader(packed, batch_size=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert torch.equal(torch.cat([next(x)["input_ids"] for x in ranks]), expected["input_ids"])


def test_bad_arguments_and_state():
    packed = _rows(4)
    with pytest.raises(ConfigError, match="batch_size"):
        PackedBatchLoader(packed, batch_size=0)
    with pytest.raises(ConfigError, match="rank=2"):
        PackedBatchLoader(packed, batch_size=1, rank=2, world_size=2)
    with pytest.raises(DataError, match="no rows"):
        PackedBatchLoader(pack_documents([], None, 8, 0), batch_size=1)
    loader = PackedBatchLoader(packed, batch_size=1)
    with pytest.raises(DataError, match="lacks"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(DataError, match="outside this dataset"):
        loader.load_state_dict({"epoch": 0, "position": 99, "seed": 0})


def test_batches_carry_their_document_bounds_computed_on_the_host():
    from ghostvis_core.attention import cu_seqlens_from_positions

    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])  # row 2 continues a document
    bounds = document_bounds(positions)
    assert bounds["cu_seqlens"].tolist() == [0, 3, 5, 6, 8, 12] and bounds["max_seqlen"] == 4
    assert bounds["cu_seqlens"].dtype == torch.int32 and isinstance(bounds["max_seqlen"], int)
    cu, longest = cu_seqlens_from_positions(positions)
    assert torch.equal(cu, bounds["cu_seqlens"]) and longest == bounds["max_seqlen"]
