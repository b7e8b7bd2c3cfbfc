"""The training loop: one code path for CPU, one GPU, torchrun DDP and FSDP2.

Loss normalisation: the model returns the SUM of per-token losses; each optimizer step divides by the number
of non-ignored target tokens in the whole global batch (all micro-batches, all ranks), so every target token
weighs the same no matter how tokens fall into micro-batches or ranks (exact SFT weighting; a fully masked
micro-batch adds 0). DDP and FSDP2 (its reduce-scatter) both average gradients over ranks, so each rank
scales its loss by world_size first:
    grad = sum_ranks (world_size * sum_loss_r / N_global) / world_size = d(sum_all_loss / N_global).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ghostvis_core.errors import TrainingAborted
from ghostvis_core.log import get_logger, setup_logging
from ghostvis_core.train import checkpoint as ckpt
from ghostvis_core.train import setup
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    check_fsdp,
    destroy_distributed,
    gather_full_model_state,
    gather_full_optimizer_state,
    init_distributed,
    load_full_model_state,
    shard_optimizer_state,
    wrap_model,
)
from ghostvis_core.train.metrics import (
    MetricsLog,
    ProgressPrinter,
    compute_mfu,
    peak_flops,
    peak_memory_gib,
)
from ghostvis_core.train.schedule import apply_lr, lr_multiplier

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run reports back."""

    run_dir: Path
    step: int
    """Optimizer steps completed."""
    last_loss: float | None
    checkpoint: Path | None
    """The newest checkpoint written by this process, or None."""
    stopped_by: str | None = None
    """'SIGTERM' / 'SIGINT' when a signal stopped the run early, else None."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, loss) of every step run in this process."""


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the end of the current step and returns."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without the checkpoint
        self.signal_name = name
        get_logger().warning(f"{name} received: finishing the current step, then saving a checkpoint")

    def install(self) -> None:
        """Install handlers (main thread only; elsewhere the run simply has no graceful stop)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker)
                return

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _compute_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """cfg.dtype resolved: auto = bfloat16 on CUDA, float32 on CPU."""
    if cfg.dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return cfg.dtype


def _autocast(cfg: TrainConfig, device: torch.device):
    if _compute_dtype(cfg, device) == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token loss of one micro-batch (targets -100 ignored; 0 when none are left)."""
    return model(batch["input_ids"], batch["targets"], batch["position_ids"], loss_reduction="sum")


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    world_size: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients of (global sum loss / global target count); returns local sum loss, global count."""
    loss_fn = loss_fn or forward_sum
    local_count = sum((mb["targets"] != IGNORE_INDEX).sum() for mb in micro_batches)
    global_count = all_reduce_sum(torch.as_tensor(local_count, dtype=torch.int64).clone())
    scale = world_size / max(int(global_count.item()), 1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=micro_batches[0]["input_ids"].device)
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # all-reduce gradients only once, after the last micro-batch (DDP: no_sync; FSDP2: the flag)
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(last)
        with sync:
            with autocast():
                micro_loss = loss_fn(model, mb)
            (micro_loss * scale).backward()
        loss_sum += micro_loss.detach().float()
    return loss_sum, global_count


def _full_state_dicts(raw_model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full (unsharded) tensors, for the rank-0 writer.

    FSDP2 gathers every sharded tensor (a collective: every rank calls this) into the same format DDP saves,
    so a checkpoint does not depend on the layout that wrote it.
    """
    if fsdp:
        return gather_full_model_state(raw_model), gather_full_optimizer_state(optimizer)
    return raw_model.state_dict(), optimizer.state_dict()


def _load_state_dicts(raw_model, optimizer, model_state, optim_state, fsdp: bool) -> None:
    """Load full state dicts read from disk (every rank read the same files); FSDP2 keeps this rank's shard."""
    if fsdp:
        load_full_model_state(raw_model, model_state)
        if optim_state is not None:
            optimizer.load_state_dict(shard_optimizer_state(optimizer, optim_state))
        return
    raw_model.load_state_dict(model_state, strict=True)
    if optim_state is not None:
        optimizer.load_state_dict(optim_state)


def _oom_message(cfg: TrainConfig, step: int) -> str:
    return (
        f"CUDA out of memory at step {step} with --device-batch-size {cfg.device_batch_size} and "
        f"--pack-max-length {cfg.pack_max_length}: lower device_batch_size first (total_batch_size "
        f"{cfg.total_batch_size if cfg.total_batch_size > 0 else 'per step'} is kept by gradient accumulation), "
        "then pack_max_length; or use fsdp=true. The last checkpoint is intact: rerun the same command to resume."
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Train per `cfg` (single process or under torchrun); returns when done or stopped by a signal."""
    setup_logging()
    info = init_distributed()
    try:
        return _train(cfg, info)
    finally:
        destroy_distributed()


def _train(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    from ghostvis_core.backends import log_plan
    from ghostvis_core.data import PackedBatchLoader
    from ghostvis_core.env import probe_env
    from ghostvis_core.gpt import GPT
    from ghostvis_core.optim import build_optimizer
    from ghostvis_core.train.run_plan import plan_for_training

    log = get_logger()
    device = info.device
    if cfg.fsdp:
        check_fsdp(info)  # before the dataset and model are built
    grad_accum = cfg.grad_accum_steps(info.world_size)
    tokens_per_step = cfg.total_tokens_per_step(info.world_size)
    run_dir = cfg.run_dir

    start = setup.find_start(cfg)
    tokenizer = setup.load_tokenizer(cfg, start)
    packed = setup.build_dataset(cfg, tokenizer)
    model_config = setup.build_model_config(cfg, tokenizer.vocab_size, start)

    plan = plan_for_training(cfg, probe_env(), device.type, info.world_size, model_config)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        raw_model = GPT(model_config, plan)
    num_params = raw_model.num_params()
    log.info(f"Model: preset {cfg.preset}, {num_params / 1e6:.2f}M parameters "
             f"({raw_model.num_params(exclude_embedding=True) / 1e6:.2f}M without the embedding), "
             f"{model_config.n_layer} layers x {model_config.n_embd}, vocab {model_config.vocab_size}")
    log.info(f"Batch: {cfg.device_batch_size} rows x {cfg.pack_max_length} tokens x {info.world_size} rank(s) x "
             f"{grad_accum} accumulation step(s) = {tokens_per_step:,} tokens per step")

    # weights first (plain tensors), then wrap; the optimizer is built on the wrapped (maybe sharded) params
    model_state = optim_state = None
    if start.resume_dir is not None:
        setup.check_resume_compatible(model_config, start.resume_state, start.resume_dir)
        model_state = ckpt.load_model_state(start.resume_dir)
        optim_state = ckpt.load_optimizer_state(start.resume_dir)
    elif start.init_dir is not None:
        model_state = ckpt.load_model_state(start.init_dir)
    if model_state is not None and not cfg.fsdp:
        raw_model.load_state_dict(model_state, strict=True)  # before DDP wraps (it broadcasts rank 0's weights)
    use_compile = plan.compiled
    why = f"compile={str(cfg.compile).lower()}" if cfg.compile is not None else f"the default on {device.type}"
    log.info(f"torch.compile: {'on' if use_compile else 'off'} ({why}; --compile / --no-compile to change)")
    log_plan(plan)  # the one banner, from the plan that already includes the compile decision
    if use_compile:
        # regional compilation: the identical blocks share one graph (whole-model compile takes far longer,
        # and the attention setup and chunked loss are deliberate eager regions)
        raw_model.compile_blocks()
    param_dtype = torch.bfloat16 if _compute_dtype(cfg, device) == "bfloat16" else None
    model = wrap_model(raw_model, info, cfg.fsdp, param_dtype=param_dtype)
    optimizer, description = build_optimizer(raw_model, cfg.optim, plan)
    if cfg.fsdp and model_state is not None:
        _load_state_dicts(raw_model, optimizer, model_state, optim_state, fsdp=True)
    elif optim_state is not None:
        optimizer.load_state_dict(optim_state)
    del model_state, optim_state

    loader = PackedBatchLoader(packed, cfg.device_batch_size, rank=info.rank, world_size=info.world_size,
                               seed=cfg.seed)
    step, tokens_seen = 0, 0
    if start.resume_state is not None:
        state = start.resume_state
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        loaders, rngs = state.get("loader") or [], state.get("rng") or []
        same_world = int(state.get("world_size", 1)) == info.world_size
        if loaders:
            loader.load_state_dict(loaders[info.rank] if same_world else loaders[0])
        if rngs:
            ckpt.restore_rng_state(rngs[info.rank] if same_world else rngs[0], device)
    if step >= cfg.num_steps:
        log.info(f"Run {cfg.run} already reached step {step} of num_steps={cfg.num_steps}: nothing to do "
                 "(raise num_steps to train further)")
        return TrainResult(run_dir, step, None, start.resume_dir)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale_temporaries(run_dir)
        if start.resume_dir is not None and start.resume_dir.parent.resolve() == run_dir.resolve():
            ckpt.log_superseded(ckpt.supersede_newer(run_dir, step))
        metrics.truncate_after(step)
        ckpt.write_json_atomic(run_dir / "config.json",
                               {"train": cfg.to_dict(), "model": model_config.to_dict()})
        if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
            tokenizer.save(run_dir / "tokenizer")
    barrier()
    log.info(f"Run folder: {run_dir}")

    peak = peak_flops(device)
    flops_per_token = raw_model.flops_per_token(cfg.pack_max_length)
    progress = ProgressPrinter(cfg.num_steps, enabled=info.is_main)
    stop = _StopFlag()
    stop.install()
    last_saved: Path | None = None
    losses: list[tuple[int, float]] = []
    step_times: list[float] = []
    run_start_step = step
    autocast = lambda: _autocast(cfg, device)  # noqa: E731

    def save(at_step: int) -> Path | None:
        model_sd, optim_sd = _full_state_dicts(raw_model, optimizer, cfg.fsdp)
        extra = {
            "tokens_seen": tokens_seen,
            "lr_multiplier": lr_multiplier(at_step, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac),
            "world_size": info.world_size,
            "loader": all_gather_objects(loader.state_dict()),
            "rng": all_gather_objects(ckpt.capture_rng_state(device)),
            "model_config": model_config.to_dict(),
            "recipe": cfg.recipe,
            "preset": cfg.preset,
            "time": time.time(),
        }
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(run_dir, at_step, model_state=model_sd, optimizer_state=optim_sd,
                                        state=extra, keep_last=cfg.keep_last)
            log.info(f"Saved checkpoint {path}")
        barrier()
        return path

    last_loss = None
    try:
        while step < cfg.num_steps:
            t0 = time.perf_counter()
            mult = lr_multiplier(step, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac)
            apply_lr(optimizer, mult)
            micro = [{k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
                     for _ in range(grad_accum)]
            try:
                loss_sum, count = forward_backward(model, micro, world_size=info.world_size, autocast=autocast)
                grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                             if cfg.grad_clip > 0 else torch.zeros((), device=device))
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm
                    grad_norm = grad_norm.full_tensor()
            except torch.cuda.OutOfMemoryError:
                raise TrainingAborted(_oom_message(cfg, step + 1)) from None
            # one collective for the logged loss, and the stop flag so every rank stops at the same step
            stats = torch.stack([loss_sum.float(), torch.tensor(float(stop.signal_name is not None), device=device),
                                 grad_norm.detach().float().to(device)])
            stats[:2] = all_reduce_sum(stats[:2].clone())
            loss = stats[0].item() / max(int(count.item()), 1)
            stop_now = stats[1].item() > 0
            norm = stats[2].item()
            if not math.isfinite(loss) or not math.isfinite(norm):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                kept = ckpt.latest_checkpoint(run_dir)
                raise TrainingAborted(
                    f"{what} is {loss if what == 'loss' else norm} at step {step + 1}: training stopped before "
                    f"applying it. The last good checkpoint is {kept or 'none (nothing saved yet)'}; lower "
                    f"optim.lr / optim.matrix_lr (or warm up longer), then resume with the same command"
                )
            try:
                optimizer.step()
            except torch.cuda.OutOfMemoryError:
                raise TrainingAborted(_oom_message(cfg, step + 1)) from None
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step += 1
            tokens_seen += tokens_per_step
            last_loss = loss
            losses.append((step, loss))
            dt = time.perf_counter() - t0
            if step > run_start_step + 1:  # the first step pays for warmup/compilation
                step_times.append(dt)
            if step % cfg.log_every == 0 or step == cfg.num_steps or stop_now:
                avg = sum(step_times) / len(step_times) if step_times else dt
                tok_per_s = tokens_per_step / dt
                record = {
                    "step": step, "loss": loss, "lr_mult": mult, "grad_norm": norm, "dt_ms": 1000 * dt,
                    "tok_per_s": tok_per_s, "mfu": compute_mfu(tok_per_s, flops_per_token, info.world_size, peak),
                    "peak_mem_gib": peak_memory_gib(device), "mem_kind": device.type,
                    "eta_s": avg * (cfg.num_steps - step), "tokens_seen": tokens_seen,
                }
                if info.is_main:
                    metrics.append(record)
                progress.step(record)
            at_save = cfg.save_every > 0 and step % cfg.save_every == 0
            if at_save or step == cfg.num_steps or stop_now:
                last_saved = save(step) or last_saved
            if stop_now:
                name = stop.signal_name or "a signal on another rank"
                # The user-facing "stopped by ...; resume with the same command" line is printed once, on
                # rank 0, by the recipe entry point (recipes/_main.py), which owns "the command".
                return TrainResult(run_dir, step, last_loss, last_saved, stopped_by=name, losses=losses)
    finally:
        stop.restore()

    if info.is_main:
        from ghostvis_core.train.plot import plot_loss

        plot_loss(metrics.path, run_dir / "loss.png", title=f"{cfg.recipe} / {cfg.run}")
        log.info(f"Done: {step} steps, last loss {last_loss:.4f}; checkpoint {last_saved}; "
                 f"loss curve {run_dir / 'loss.png'}")
    return TrainResult(run_dir, step, last_loss, last_saved, losses=losses)
