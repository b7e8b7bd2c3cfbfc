"""Worker for tests/test_optim_muon.py: BatchedMuon on 2 gloo ranks (torchrun), DDP-style and FSDP2-sharded.

Every rank builds the same matrices and gradients from fixed seeds and steps them 3 times, (a) as plain
replicated tensors with shard_across_ranks=True (what DDP hands the optimizer) and (b) under FSDP2 fully_shard
(DTensor row shards, among them a 15-row matrix that splits unevenly); rank 0 saves the full results.
Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/muon_ranks.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from multirank import end_rank_process

from ghostvis_core.muon import BatchedMuon

SHAPES = [(24, 16), (24, 16), (24, 16), (16, 40), (15, 8), (15, 8), (15, 8)]
STEPS = 3
KW = dict(lr=0.05, weight_decay=0.1, momentum=0.9)


def initial() -> list[torch.Tensor]:
    """The starting matrices (same on every rank and in the single-process reference)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads(step: int) -> list[torch.Tensor]:
    """Step `step`'s full gradients."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def replicated(shard: bool) -> list[torch.Tensor]:
    """STEPS updates of plain tensors; shard splits the orthogonalisation over the process group."""
    params = [torch.nn.Parameter(t.clone()) for t in initial()]
    opt = BatchedMuon(params, shard_across_ranks=shard, **KW)
    for step in range(STEPS):
        for p, g in zip(params, grads(step), strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def fsdp_sharded() -> list[torch.Tensor]:
    """The same updates under FSDP2: parameters and gradients are DTensor row shards."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    module = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in initial()])
    fully_shard(module)
    params = list(module.parameters())
    opt = BatchedMuon(params, **KW)
    for step in range(STEPS):
        for p, g in zip(params, grads(step), strict=True):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
    return [p.full_tensor().detach().clone() for p in params]


def main() -> None:
    dist.init_process_group("gloo")
    out = {"ddp": replicated(shard=True), "fsdp": fsdp_sharded()}
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    end_rank_process()  # multirank.py: the script's folder is first on its path


if __name__ == "__main__":
    main()
