"""Process-group setup for one loop on CPU and GPU: a plain process, torchrun DDP (NCCL/gloo), or FSDP2.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python -m recipes.X` has none of them and runs as world
size 1 with no process group (no collectives at all, so CPU runs stay bitwise reproducible).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ghostvis_core.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """True when a process group is initialised (torchrun with any world size)."""
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def device_type(self) -> str:
        """'cuda' or 'cpu'."""
        return self.device.type


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_distributed() -> DistInfo:
    """Initialise from torchrun's env vars (NCCL on GPU, gloo on CPU) or return world size 1."""
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available()
    if rank is None or world_size is None:
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = local_rank if local_rank is not None else rank
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} visible GPU(s): "
                "lower --nproc_per_node / --gpus to the GPU count"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group(backend=backend, device_id=device)
        else:
            dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear down the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (a no-op without a process group); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
    """DDP (or FSDP2 with fully_shard per block + root) when distributed; the model itself otherwise."""
    if fsdp:
        if info.device_type != "cuda":
            raise ConfigError("fsdp=true needs CUDA GPUs; on CPU use the default DDP (fsdp=false)")
        if not info.is_distributed:
            raise ConfigError("fsdp=true runs under torchrun: use `ghostvis train RECIPE --gpus N fsdp=true`")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # params stay fp32 (optimizer master weights), compute in bf16, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks = _transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if info.is_distributed and info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.local_rank] if info.device_type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (a ModuleList of blocks anywhere in the model)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    raise ConfigError("fsdp=true: the model has no ModuleList of transformer blocks to shard")
