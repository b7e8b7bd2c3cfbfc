"""On CUDA: the scheduler with requests of every sampling mode in one batch, each mode's decode graph captured
while other rows are mid-reply, gives the eager engine's tokens."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]  # fmt: skip


def _run(engine, prompts, settings, budgets, rows: int = 2):
    from ghostvis_core.scheduler import Request, Scheduler

    done = {}
    scheduler = Scheduler(engine, rows, 96, sync_every=4)  # few rows: later requests join busy batches
    for i, (p, s, n) in enumerate(zip(prompts, settings, budgets, strict=True)):
        scheduler.submit(Request(p, len(p), n, s, index=i, on_finish=lambda c: done.__setitem__(c.index, c)))
    scheduler.run_until_idle()
    return [done[i].token_ids for i in range(len(prompts))]


def test_mixed_sampling_modes_under_cuda_graphs_equal_eager():
    from ghostvis_core.batch_engine import Engine
    from ghostvis_core.bench.infer_bench import random_model
    from ghostvis_core.sampling import SamplingParams

    loaded = random_model("tiny", "cuda", "bfloat16")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3)]
    settings = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, seed=1),
                SamplingParams(), SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=2),
                SamplingParams(temperature=0.7, top_p=0.5, seed=3)]  # fmt: skip
    budgets = [40, 12, 30, 20, 25, 33]  # staggered: each new mode arrives while another row is mid-reply
    graphed = Engine(loaded.model)
    assert graphed.cuda_graphs
    got = _run(graphed, prompts, settings, budgets)
    want = _run(Engine(loaded.model, cuda_graphs=False), prompts, settings, budgets)
    assert got == want and [len(t) for t in got] == budgets
    assert set(graphed.batch(2, 96).graphs) == {"greedy", "sample", "filter"}


def test_the_scheduler_thread_runs_the_compiled_graphed_step_as_the_eager_engine_does():
    """fp32 (fusion's rounding cannot flip a pick there): requests submitted from this thread to the loop thread
    (the server's path: compile and capture happen in that thread) against the uncompiled eager engine."""
    import threading

    from ghostvis_core.batch_engine import Engine
    from ghostvis_core.bench.infer_bench import random_model
    from ghostvis_core.sampling import SamplingParams
    from ghostvis_core.scheduler import Request, Scheduler

    fast = random_model("tiny", "cuda", "float32")
    slow = random_model("tiny", "cuda", "float32", compile=False)
    slow.model.load_state_dict(fast.model.state_dict())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3, 8, 21)]
    sampling = [SamplingParams(), SamplingParams(temperature=0.9, seed=4)] * 4
    scheduler = Scheduler(Engine(fast.model), 4, 96, sync_every=8)
    done, all_done = {}, threading.Event()

    def finished(c):
        done[c.index] = c
        if len(done) == len(prompts):
            all_done.set()

    scheduler.start()
    try:
        for i, (p, s) in enumerate(zip(prompts, sampling, strict=True)):
            scheduler.submit(Request(p, len(p), 32, s, index=i, on_finish=finished))
        assert all_done.wait(timeout=600)
    finally:
        scheduler.stop()
    want = _run(Engine(slow.model, cuda_graphs=False), prompts, sampling, [32] * len(prompts), rows=4)
    assert [done[i].token_ids for i in range(len(prompts))] == want
