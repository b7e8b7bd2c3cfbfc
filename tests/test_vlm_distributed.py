"""vision_pretrain under torchrun on CPU (gloo): 2-rank DDP and 2-rank FSDP2 against one process with the same
global batch (the real image pipeline: built-in shapes captions, pixels decoded in DataLoader workers).

Tolerance as in test_ddp_cpu.py (the layouts sum in different orders): relative 1e-5 on step 1, 5e-4 on every
later step (measured max 6.3e-5 DDP, 1.4e-4 FSDP2 over 5 steps: the lr-3e-3 projector grows last-bit gradient
differences faster than the text test's lr).
"""

from __future__ import annotations

import pytest
from helpers import one_process_and_two_ranks
from test_train_config import subprocess_env, tiny_config

pytestmark = pytest.mark.slow

TINY_TEXT = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_kv_head": 1}


def _cfg(tmp_path, run: str, batch: int, **kw):
    return tiny_config(tmp_path, recipe="vision_pretrain", run=run, model=dict(TINY_TEXT), pack_max_length=48,
                       num_steps=5, save_every=0, init_from="none", freeze="", device_batch_size=batch, **kw)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_rank_vision_pretrain_matches_one_process(tmp_path, fsdp):
    env = subprocess_env(tmp_path)
    single, multi = _cfg(tmp_path, "single", 4), _cfg(tmp_path, "multi", 2, fsdp=fsdp)
    a, b, stderr = one_process_and_two_ranks(tmp_path, "vision_pretrain", single, multi, env)
    assert "2 rank(s)" in stderr
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 6))
    rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True)]
    print(f"{'FSDP2' if fsdp else 'DDP'} vs one process, relative loss difference per step:",
          " ".join(f"{r:.1e}" for r in rel))
    assert rel[0] <= 1e-5 and max(rel) <= 5e-4
