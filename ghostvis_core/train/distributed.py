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


def check_fsdp(info: DistInfo) -> None:
    """ConfigError unless FSDP2 can run: it needs a process group (torchrun), of any size, on GPU or CPU."""
    if not info.is_distributed:
        raise ConfigError(
            "fsdp=true runs under torchrun (a process group shards the model): use "
            "`ghostvis train RECIPE --gpus N --fsdp`, or on CPU "
            "`python -m torch.distributed.run --nproc_per_node N -m recipes.RECIPE fsdp=true`"
        )


def wrap_model(
    model: torch.nn.Module, info: DistInfo, fsdp: bool, *, param_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """DDP (or FSDP2 with fully_shard per block + root) when distributed; the model itself otherwise.

    FSDP2 runs on CUDA (NCCL) and on CPU (gloo), with any world size under torchrun (one rank runs the same
    code path without saving memory). `param_dtype` is the dtype FSDP2 all-gathers parameters in for compute
    (bf16 under bf16 autocast); None keeps the fp32 master weights, as DDP does.
    """
    if fsdp:
        check_fsdp(info)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # params stay fp32 (optimizer master weights); compute in param_dtype; gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if info.is_distributed and info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [info.local_rank] if info.device_type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    return model


# ------------------------------------------------------------------------------------------------ FSDP2 state
# Checkpoints hold full tensors in one format whatever the layout: model.safetensors as DDP writes it and the
# optimizer's index-keyed state_dict (GhostVisOptimizer.state_dict()), so DDP and FSDP runs (and any world
# size) resume each other's checkpoints. Under FSDP2 parameters and the optimizer state that mirrors them
# (exp_avg, momentum_buffer, ...) are DTensors sharded on dim 0; gathering calls full_tensor() (a collective:
# every rank, same order), loading slices the full tensor every rank read from disk (no communication).


def _is_dtensor(value: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _gather(value: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """Full CPU copy of a (maybe sharded) tensor on ranks that keep it; every rank must call it for a DTensor."""
    full = value.full_tensor() if _is_dtensor(value) else value
    return full.detach().to("cpu", copy=True) if keep else None


def gather_full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0 ({} elsewhere); tied weights stay one shared tensor."""
    keep = not dist.is_initialized() or dist.get_rank() == 0
    by_id: dict[int, torch.Tensor | None] = {}
    out: dict[str, torch.Tensor] = {}
    # keep_vars: a tied weight is the same Parameter under both names, so it is gathered once and saved as an
    # alias (plain state_dict() would detach it into two objects)
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in by_id:
            by_id[id(value)] = _gather(value, keep)
        if keep:
            out[name] = by_id[id(value)]
    return out


def gather_full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered to a full CPU tensor (rank 0 keeps it)."""
    keep = not dist.is_initialized() or dist.get_rank() == 0

    def full(obj):
        if isinstance(obj, torch.Tensor):
            return _gather(obj, keep) if _is_dtensor(obj) else obj
        if isinstance(obj, dict):
            return {k: full(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [full(v) for v in obj]
        return obj

    return full(optimizer.state_dict())


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full` laid out like `param` (itself when param is not sharded)."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank holds the same full tensor (read from disk), so each slices its own shard
    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a (maybe FSDP2-sharded) model; strict, like load_state_dict."""
    current = model.state_dict(keep_vars=True)
    sharded = dict(state)
    for name, value in current.items():
        full = state.get(name)
        if full is not None and tuple(full.shape) == tuple(value.shape):
            sharded[name] = _shard_like(full.to(value.dtype), value)
    # missing / unexpected keys and shape mismatches are reported by load_state_dict itself, as without FSDP
    model.load_state_dict(sharded, strict=True)


def shard_optimizer_state(optimizer, state: dict) -> dict:
    """A full GhostVisOptimizer state_dict with each parameter-shaped tensor sharded like its parameter.

    torch's index-keyed format numbers the parameters of each inner optimizer in param_groups order; a state
    tensor of the parameter's shape (exp_avg, exp_avg_sq, momentum_buffer) is sharded like it, anything else
    (the scalar step) stays as it is, which is how the optimizer creates its state under FSDP2.
    """
    out = dict(state)
    inner = list(getattr(optimizer, "optimizers", [optimizer]))
    saved = state.get("optimizers")
    if not isinstance(saved, list) or len(saved) != len(inner):
        return out  # GhostVisOptimizer.load_state_dict names the mismatch
    converted = []
    for opt, sd in zip(inner, saved, strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        per_param = {}
        for index, entries in sd["state"].items():
            param = params[int(index)] if int(index) < len(params) else None
            per_param[index] = {
                k: _shard_like(v.to(param.dtype) if v.is_floating_point() else v, param)
                if param is not None and k != "step" and isinstance(v, torch.Tensor)
                and tuple(v.shape) == tuple(param.shape)
                else v
                for k, v in entries.items()
            }
        converted.append({**sd, "state": per_param})
    out["optimizers"] = converted
    return out


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one: those of every ModuleList of blocks in the model (a GPT has
    one; a VLM two, the tower's encoder layers and the language model's decoder blocks)."""
    blocks: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and not any(
            module is sub for b in blocks for sub in b.modules()
        ):
            blocks.extend(module)
    if not blocks:
        raise ConfigError("fsdp=true: the model has no ModuleList of transformer blocks to shard")
    return blocks
