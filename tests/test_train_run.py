"""The loop's pieces: one restore path for weights and optimizer, step and loss accounting."""

from __future__ import annotations

import torch
from plans import cpu_gpt, cpu_optimizer
from test_checkpoint import _save, _tied_model_and_optimizer

from ghostvis_core.config import OptimizerConfig
from ghostvis_core.train.run import Progress, restore_model_and_optimizer


def test_restore_loads_weights_and_optimizer_state_exactly(tmp_path):
    model, opt = _tied_model_and_optimizer()
    path = _save(tmp_path, 3, model, opt)
    torch.manual_seed(1)
    fresh = cpu_gpt(model.config)
    fresh_opt, _ = cpu_optimizer(fresh, OptimizerConfig(lr=1e-2))
    restore_model_and_optimizer(fresh, fresh_opt, path, with_optimizer=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # one more identical step on both gives identical weights: the optimizer state came back whole
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad(set_to_none=True)
        m(ids, ids).backward()
        o.step()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_progress_counts_steps_and_tokens():
    progress = Progress(step=4, tokens_seen=400, start_step=4)
    progress.advance(100)
    progress.advance(100)
    assert (progress.step, progress.tokens_seen, progress.last_loss) == (6, 600, None)  # queued, not read yet
    progress.record_loss(5, 2.5)
    progress.record_loss(6, 2.25)
    assert (progress.step, progress.tokens_seen, progress.last_loss) == (6, 600, 2.25)
    assert progress.losses == [(5, 2.5), (6, 2.25)]
    result = progress.result(None)
    assert result.step == 6 and result.losses == [(5, 2.5), (6, 2.25)] and result.stopped_by is None
