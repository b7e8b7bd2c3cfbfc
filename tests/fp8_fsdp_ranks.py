"""Worker for tests/test_fp8.py: fp8 block linears (tensorwise, float8 all-gather) under FSDP2 on 2 gloo ranks,
with the sharded Muon; rank 0 saves the two steps' losses and the gathered full state dict.
Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fp8_fsdp_ranks.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from multirank import end_rank_process

from ghostvis_core.backends import RunFacts, plan_run
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.env import probe_env
from ghostvis_core.fp8 import convert_to_fp8
from ghostvis_core.gpt import GPT
from ghostvis_core.optim import build_optimizer
from ghostvis_core.train.distributed import DistInfo, gather_full_model_state, wrap_model

CFG = GPTConfig(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, vocab_size=64, sequence_len=16, mlp_hidden=64)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plan = plan_run(probe_env(), RunFacts("cpu", "float32", world_size=2, fsdp=True, optimizer="muon"))
    # the CPU plan refuses fp8; the capable plan's choice is applied by hand (conversion and training run here)
    capable = plan_run(_capable_env(), RunFacts("cuda", "bfloat16", compiled=True, fp8="tensorwise", fsdp=True))
    torch.manual_seed(0)
    model = GPT(CFG, plan)
    convert_to_fp8(model, capable.fp8, fsdp=True)
    wrapped = wrap_model(model, DistInfo(rank, 2, rank, torch.device("cpu")), True)
    opt, _ = build_optimizer(model, OptimizerConfig(backend="muon", lr=1e-2), plan)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wrapped(ids, torch.roll(ids, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    full = gather_full_model_state(model)
    if rank == 0:
        torch.save({"losses": losses, "state": full,
                    "all_gather": capable.fp8.reason}, sys.argv[1])
    end_rank_process()  # multirank.py: the script's folder is first on its path


def _capable_env():
    import dataclasses

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from helpers import _pkg, make_env

    env = make_env("h100")
    return dataclasses.replace(env, packages={**env.packages, "torchao": _pkg("torchao", "0.18.0")})


if __name__ == "__main__":
    main()
