"""The device prefetcher: on the CPU it is the loader itself; on CUDA the next batch is copied from pinned memory
on a side stream while the current step runs, and its state is the loader's position after the batches the
loop consumed (so a resumed run sees the same batches)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_batch

from ghostvis_core.data.loader import PackedBatchLoader
from ghostvis_core.data.packing import PackedData
from ghostvis_core.train.prefetch import DevicePrefetcher


def _loader(seed: int = 0) -> PackedBatchLoader:
    n, T = 10, 8
    ids = torch.arange(n * T, dtype=torch.int64).reshape(n, T).numpy()
    packed = PackedData(input_ids=ids, targets=ids + 1, position_ids=ids % T, seq_len=T, num_docs=n)
    return PackedBatchLoader(packed, batch_size=3, seed=seed)


def test_cpu_yields_the_loaders_batches_in_order_and_resumes_there():
    plain, wrapped = _loader(), DevicePrefetcher(_loader(), torch.device("cpu"))
    for _ in range(5):  # crosses an epoch boundary (10 rows, 3 per batch)
        a, b = next(plain), next(wrapped)
        assert_same_batch(a, b)
    assert wrapped.state_dict() == plain.state_dict()
    assert wrapped.batch_size == 3 and wrapped.steps_per_epoch == pytest.approx(10 / 3)  # reads through
    resumed = DevicePrefetcher(_loader(), torch.device("cpu"))
    resumed.load_state_dict(wrapped.state_dict())
    assert_same_batch(next(plain), next(resumed))


@pytest.mark.gpu
def test_cuda_copies_ahead_on_a_side_stream_and_keeps_the_consumed_position():
    device = torch.device("cuda")
    plain, wrapped = _loader(), DevicePrefetcher(_loader(), device)
    first = next(wrapped)
    # one batch in flight beyond what was consumed, yet the state is the consumed position
    assert wrapped._pending is not None and wrapped._pending[0]["input_ids"].is_cuda
    expected = next(plain)
    assert wrapped.state_dict() == plain.state_dict()
    torch.cuda.synchronize()
    assert first["max_seqlen"] == expected["max_seqlen"]  # a host int passes through, never copied
    assert all(first[k].is_cuda and torch.equal(first[k].cpu(), expected[k]) for k in expected if k != "max_seqlen")
    # the copy ran on the side stream: the compute stream waited on its event, not on the whole device
    assert wrapped._stream != torch.cuda.current_stream()
    for _ in range(6):
        got, want = next(wrapped), next(plain)
        x = got["input_ids"].float() @ torch.ones(got["input_ids"].shape[1], 4, device=device)  # use it
        assert torch.equal(got["targets"].cpu(), want["targets"]) and x.shape == (3, 4)
    resumed = DevicePrefetcher(_loader(), device)
    resumed.load_state_dict(wrapped.state_dict())
    assert torch.equal(next(resumed)["input_ids"].cpu(), next(plain)["input_ids"])


def test_loop_reads_the_device_only_at_read_points_with_the_same_losses(tmp_path, monkeypatch):
    """log_every=4, save_every=6: the host reads step numbers at steps 4, 6, 8, 12 only (one transfer each),
    yet every step's loss is recorded, equal to a run that reads every step; a NaN at step 6 is reported at
    its step when read and nothing after the last good checkpoint is saved."""
    from test_train_config import tiny_config

    from ghostvis_core import checkpoint as ckpt
    from ghostvis_core.errors import TrainingAborted
    from ghostvis_core.train import loop

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "home"))
    every = loop.train(tiny_config(tmp_path, run="every"))
    reads = []
    real_read = loop.read_steps

    def counted(run, progress, pending, since):
        reads.append([p.step for p in pending])
        return real_read(run, progress, pending, since)

    monkeypatch.setattr(loop, "read_steps", counted)
    lagged = loop.train(tiny_config(tmp_path, run="lagged", log_every=4, save_every=6))
    assert reads == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10, 11, 12]]
    assert lagged.losses == every.losses and len(lagged.losses) == 12

    from helpers import poison_loss_at

    poison_loss_at(monkeypatch, loop, 7)
    cfg = tiny_config(tmp_path, run="nan", log_every=4, save_every=6)
    with pytest.raises(TrainingAborted) as err:
        loop.train(cfg)
    assert "loss is nan at step 7: training stopped at step 8 without saving" in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run_dir)] == [6]
