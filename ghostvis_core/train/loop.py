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
from dataclasses import dataclass

import torch

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.backends import BackendPlan
from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.errors import TrainingAborted
from ghostvis_core.log import get_logger, setup_logging
from ghostvis_core.train import run_lock
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
)
from ghostvis_core.train.metrics import compute_mfu, peak_memory_gib
from ghostvis_core.train.run import Progress, StepStats, TrainingRun, TrainResult, build_run
from ghostvis_core.train.schedule import apply_lr, group_lrs


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


def _autocast(plan: BackendPlan):
    """bf16 autocast when the plan's compute dtype is bfloat16 (parameters and optimizer state stay fp32)."""
    if plan.dtype == "bfloat16":
        return torch.autocast(device_type=plan.device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed token loss of one micro-batch (targets -100 ignored; 0 when none are left). A batch with
    "pixel_values" (image chats) goes to the VLM's forward, whose second argument they are. The loaders'
    document bounds (cu_seqlens, max_seqlen) go along, so packed attention needs no host sync."""
    bounds = (batch["cu_seqlens"], batch["max_seqlen"]) if "cu_seqlens" in batch else None
    if "pixel_values" in batch:
        return model(batch["input_ids"], batch["pixel_values"], batch["targets"], batch["position_ids"],
                     loss_reduction="sum", doc_bounds=bounds)  # fmt: skip
    return model(batch["input_ids"], batch["targets"], batch["position_ids"], loss_reduction="sum",
                 doc_bounds=bounds)  # fmt: skip


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
    # a device tensor, not a Python number: reading the count would make the host wait for the device
    scale = world_size / global_count.clamp(min=1).double()
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
            (micro_loss * scale.to(micro_loss.dtype)).backward()
        loss_sum += micro_loss.detach().float()
    return loss_sum, global_count


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
        # one trainer per run folder, taken before anything reads checkpoints or writes (run_lock.py)
        with run_lock.hold(cfg.run_dir, info.is_main, share=broadcast_object if info.is_distributed else None):
            result = _train(cfg, info)
        # Every rank reaches teardown together: a gloo rank that destroys its group while another is still
        # writing the loss plot aborts at exit ("terminate called without an active exception").
        barrier()
        return result
    finally:
        destroy_distributed()


def _train(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    """Build (restoring a checkpoint if there is one), then step, log and save until num_steps or a signal.

    Steps are queued without waiting for the device: each leaves its loss, token count, gradient norm and the
    stop flag on the device (`PendingStep`), and the host reads them in one transfer only at a read point (a
    log step, a save step, the last step). There every pending step is checked (a non-finite loss or gradient
    norm aborts before anything is saved), counted and logged; a stop signal takes effect at the next read
    point (at most log_every steps later), where every rank sees the same all-reduced flag.
    """
    run = build_run(cfg, info)
    progress = run.restore()
    if progress.step >= cfg.num_steps:
        get_logger().info(f"Run {cfg.run} already reached step {progress.step} of num_steps={cfg.num_steps}: "
                          "nothing to do (raise num_steps to train further)")
        return TrainResult(cfg.run_dir, progress.step, None, run.start.resume_dir)
    run.prepare_run_dir(progress.step)
    stop = _StopFlag()
    stop.install()
    pending: list[PendingStep] = []
    since = time.perf_counter()
    try:
        while progress.step < cfg.num_steps:
            pending.append(train_step(run, progress, stop))
            step = progress.step
            at_save = cfg.save_every > 0 and step % cfg.save_every == 0
            if not (step % cfg.log_every == 0 or at_save or step == cfg.num_steps):
                continue
            stats = read_steps(run, progress, pending, since)  # the one host sync of these steps
            pending.clear()
            log_step(run, progress, stats)
            if at_save or step == cfg.num_steps or stats.stop_now:
                progress.last_saved = run.save(progress) or progress.last_saved
            since = time.perf_counter()
            if stats.stop_now:
                # The user-facing "stopped by ...; resume with the same command" line is printed once, on
                # rank 0, by the recipe entry point (recipes/_main.py), which owns "the command".
                return progress.result(cfg.run_dir, stopped_by=stop.signal_name or "a signal on another rank")
    finally:
        stop.restore()
    run.finish(progress)
    return progress.result(cfg.run_dir)


@dataclass
class PendingStep:
    """What a queued step leaves on the device for the next read point."""

    step: int
    stats: torch.Tensor
    """(loss sum over ranks, target count over ranks, stop flag over ranks, images over ranks, grad norm)."""
    lr_mult: float
    lrs: dict[str, float]
    data_s: float


def train_step(run: TrainingRun, progress: Progress, stop: _StopFlag) -> PendingStep:
    """Queue one optimizer step (all micro-batches) without waiting for the device; raises TrainingAborted on
    OOM. Its numbers stay on the device until read_steps."""
    cfg, device = run.cfg, run.info.device
    mult = run.schedule.multiplier(progress.step)
    apply_lr(run.optimizer, mult)
    lrs = group_lrs(run.optimizer)
    t_data = time.perf_counter()
    micro = [next(run.loader) for _ in range(run.grad_accum)]  # on the device (train/prefetch.py)
    data_s = time.perf_counter() - t_data  # the step's wait on the loader (decoding it could not hide)
    images = sum(mb["pixel_values"].shape[0] for mb in micro if "pixel_values" in mb)
    try:
        loss_sum, count = forward_backward(run.model, micro, world_size=run.info.world_size,
                                           autocast=lambda: _autocast(run.plan))
        grad_norm = (torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros((), device=device))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm
            grad_norm = grad_norm.full_tensor()
        # one collective for the logged loss, the images and the stop flag (every rank stops at the same step);
        # the host values travel through pinned memory, so queuing them does not wait for the device
        host = torch.tensor([float(stop.signal_name is not None), float(images)], pin_memory=device.type == "cuda")
        summed = all_reduce_sum(torch.cat([loss_sum.float().reshape(1), host.to(device, non_blocking=True)]))
        stats = torch.cat([summed[:1].double(), count.double().reshape(1), summed[1:].double(),
                           grad_norm.detach().double().reshape(1).to(device)])
        run.optimizer.step()
    except torch.cuda.OutOfMemoryError:
        raise TrainingAborted(_oom_message(cfg, progress.step + 1)) from None
    run.optimizer.zero_grad(set_to_none=True)
    progress.advance(run.tokens_per_step)
    return PendingStep(step=progress.step, stats=stats, lr_mult=mult, lrs=lrs, data_s=data_s)


def read_steps(run: TrainingRun, progress: Progress, pending: list[PendingStep], since: float) -> StepStats:
    """Read the pending steps' numbers (one device-to-host transfer, which waits for them), abort on the first
    non-finite loss or gradient norm, record each step's loss; the last step's StepStats."""
    cfg = run.cfg
    rows = torch.stack([p.stats for p in pending]).tolist()
    dt = (time.perf_counter() - since) / len(pending)  # the device is idle again: the steps' average time
    for p, (loss_sum, count, _stop, _images, norm) in zip(pending, rows, strict=True):
        loss = loss_sum / max(int(count), 1)
        if not math.isfinite(loss) or not math.isfinite(norm):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            kept = ckpt.latest_checkpoint(cfg.run_dir)
            raise TrainingAborted(
                f"{what} is {loss if what == 'loss' else norm} at step {p.step}: training stopped at step "
                f"{pending[-1].step} without saving. The last good checkpoint is "
                f"{kept or 'none (nothing saved yet)'}; lower optim.lr / optim.matrix_lr (or warm up longer), "
                "then resume with the same command"
            )
        progress.record_loss(p.step, loss)
    last = pending[-1]
    _, _, stop_flag, images, norm = rows[-1]
    return StepStats(loss=progress.last_loss, grad_norm=norm, lr_mult=last.lr_mult, lrs=last.lrs, dt=dt,
                     stop_now=stop_flag > 0, images=int(images), data_s=last.data_s, steps=len(pending))


def log_step(run: TrainingRun, progress: Progress, stats: StepStats) -> None:
    """Record the steps' time; at a log step (and the last / a stopping one) a metrics line."""
    cfg, info, step = run.cfg, run.info, progress.step
    first_of_process = step - stats.steps <= progress.start_step  # that interval paid for warmup/compilation
    if not first_of_process:
        progress.step_times.extend([stats.dt] * stats.steps)
    if not (step % cfg.log_every == 0 or step == cfg.num_steps or stats.stop_now):
        return
    avg = sum(progress.step_times) / len(progress.step_times) if progress.step_times else stats.dt
    tok_per_s = run.tokens_per_step / stats.dt
    # MFU counts the tower too: LLM flops per token + the tower's flops per image x images per token
    flops_per_token = run.flops_per_token + run.flops_per_image * stats.images / run.tokens_per_step
    record = {
        "step": step, "loss": stats.loss, "lr_mult": stats.lr_mult, "lr": stats.lrs, "grad_norm": stats.grad_norm,
        "dt_ms": 1000 * stats.dt, "tok_per_s": tok_per_s,
        "mfu": compute_mfu(tok_per_s, flops_per_token, info.world_size, run.peak_flops),
        "data_ms": 1000 * stats.data_s,
        "peak_mem_gib": peak_memory_gib(info.device), "mem_kind": info.device.type,
        "eta_s": avg * (cfg.num_steps - step), "tokens_seen": progress.tokens_seen,
    }
    if run.flops_per_image:
        record["images_per_s"] = stats.images / stats.dt
    if info.is_main:
        run.metrics.append(record)
    run.printer.step(record)
