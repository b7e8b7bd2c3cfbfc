"""A training run's parts and progress: build them, restore them from a checkpoint, save them into one.

The loop (loop.py) steps a `TrainingRun` (what is built once: config, model, optimizer, loader, run folder)
and a `Progress` (what changes every step and goes into state.json as a TrainState).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ghostvis_core import checkpoint as ckpt
from ghostvis_core.atomic import write_json_atomic
from ghostvis_core.backends import BackendPlan
from ghostvis_core.checkpoint import TrainState
from ghostvis_core.log import get_logger
from ghostvis_core.models import ModelConfig, build_model, language_model, model_kind_of, text_config
from ghostvis_core.train import launch, setup
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.distributed import (
    DistInfo,
    all_gather_objects,
    barrier,
    check_fsdp,
    gather_full_model_state,
    gather_full_optimizer_state,
    load_full_model_state,
    shard_optimizer_state,
    wrap_model,
)
from ghostvis_core.train.freeze import FreezeSpec, apply_freeze, parse_freeze
from ghostvis_core.train.log_backends import open_log_backends
from ghostvis_core.train.metrics import MetricsLog, ProgressPrinter, peak_flops
from ghostvis_core.train.prefetch import DevicePrefetcher
from ghostvis_core.train.recipe_spec import RecipeSpec, spec_for
from ghostvis_core.train.schedule import LRSchedule, apply_lr, group_lrs, resume_schedule


def build_model_and_optimizer(cfg: TrainConfig, model_config: ModelConfig, info: DistInfo,
                              freeze: FreezeSpec | None = None):
    """(plan, raw model, wrapped model, optimizer): the run's one backend plan, then the model (GPT or VLM, by
    its config) built with it on the device, `freeze` applied, compiled if the plan says so, DDP/FSDP2-wrapped,
    and its optimizer over the trainable parameters.

    Weights are the seeded init; restore() loads a checkpoint's into the wrapped model afterwards.
    """
    from ghostvis_core.env import probe_env
    from ghostvis_core.optim import build_optimizer
    from ghostvis_core.plan_banner import log_plan
    from ghostvis_core.train.run_plan import plan_for_training

    device = info.device
    plan = plan_for_training(cfg, probe_env(), device.type, info.world_size, text_config(model_config))
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        raw_model = build_model(model_config, plan)
    trainable, frozen = apply_freeze(raw_model, freeze or parse_freeze(None))
    get_logger().info(f"Frozen: {(freeze or parse_freeze(None)).describe()}; trainable {trainable / 1e6:.3f}M "
                      f"of {(trainable + frozen) / 1e6:.3f}M parameters")
    why = f"compile={str(cfg.compile).lower()}" if cfg.compile is not None else f"the default on {device.type}"
    get_logger().info(f"torch.compile: {'on' if plan.compiled else 'off'} ({why}; --compile / --no-compile to change)")
    log_plan(plan)  # the one banner, from the plan that already holds the compile decision and the dtype
    if plan.fp8.backend != "none":
        from ghostvis_core.fp8 import convert_to_fp8, describe_fp8

        get_logger().info(describe_fp8(raw_model, plan.fp8))
        convert_to_fp8(raw_model, plan.fp8, fsdp=cfg.fsdp)  # before compile and DDP/FSDP2 wrapping
    if plan.compiled:
        # regional compilation: the identical blocks share one graph (whole-model compile takes far longer,
        # and the attention setup and chunked loss are deliberate eager regions)
        raw_model.compile_blocks()
    param_dtype = torch.bfloat16 if plan.dtype == "bfloat16" else None
    model = wrap_model(raw_model, info, cfg.fsdp, param_dtype=param_dtype)
    optimizer, _ = build_optimizer(raw_model, cfg.optim, plan)
    return plan, raw_model, model, optimizer


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


@dataclass
class StepStats:
    """What one optimizer step measured (every rank holds the same numbers)."""

    loss: float
    grad_norm: float
    lr_mult: float
    lrs: dict[str, float]
    """The learning rate of each optimizer group in this step, by group name."""
    dt: float
    """Seconds per step, averaged over the steps since the previous read point (the device idle at both)."""
    stop_now: bool
    """A stop signal reached some rank: every rank saves and returns after this step."""
    images: int = 0
    """Images in the step over all ranks (image-chat runs)."""
    data_s: float = 0.0
    """Seconds this rank waited on its loader for the step's batches."""
    steps: int = 1
    """Steps read at this read point (dt is their average)."""


@dataclass
class Progress:
    """Where the run stands; step and tokens_seen go into each checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    start_step: int = 0
    """The step this process started at (its first step pays for warmup and compilation)."""
    last_loss: float | None = None
    last_saved: Path | None = None
    """The newest checkpoint this process wrote."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)

    def advance(self, tokens: int) -> None:
        """Count one queued optimizer step (its loss is recorded when the host reads it: record_loss)."""
        self.step += 1
        self.tokens_seen += tokens

    def record_loss(self, step: int, loss: float) -> None:
        """The loss of `step`, read from the device."""
        self.last_loss = loss
        self.losses.append((step, loss))

    def result(self, run_dir: Path, stopped_by: str | None = None) -> TrainResult:
        """The TrainResult of this process."""
        return TrainResult(run_dir, self.step, self.last_loss, self.last_saved, stopped_by=stopped_by,
                           losses=self.losses)


@dataclass
class TrainingRun:
    """What a run builds once, before step 0."""

    cfg: TrainConfig
    info: DistInfo
    spec: RecipeSpec
    start: setup.StartPoint
    tokenizer: Any
    model_config: ModelConfig
    plan: BackendPlan
    """The run's one backend plan (device, dtype, compile, every backend)."""
    raw_model: torch.nn.Module
    model: torch.nn.Module
    """raw_model wrapped for DDP / FSDP2 (raw_model itself in one process)."""
    optimizer: Any
    loader: Any
    grad_accum: int
    tokens_per_step: int
    metrics: MetricsLog
    printer: ProgressPrinter
    flops_per_token: float
    """Training FLOPs per token of the language model."""
    peak_flops: float | None
    flops_per_image: float = 0.0
    """Training FLOPs per image of the tower and projector (0 for a GPT); MFU adds images x this."""
    schedule: LRSchedule | None = None
    """The LR multiplier per step: the plan; restore() continues it from a resumed checkpoint when needed."""

    def restore(self) -> Progress:
        """Load the start point: weights (resume or init_from), and on resume optimizer, loader and RNG too."""
        start, info = self.start, self.info
        load_start_weights(self.raw_model, self.optimizer, start)
        state = start.resume_state
        cfg = self.cfg
        if state is None:
            self.schedule, message = resume_schedule(cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac)
        else:
            # the optimizer state holds the rate its last step ran at (lr = initial_lr x that step's multiplier)
            group = self.optimizer.param_groups[0]
            last = group["lr"] / group["initial_lr"] if group.get("initial_lr") else None
            self.schedule, message = resume_schedule(cfg.num_steps, cfg.warmup_steps, cfg.warmdown_frac,
                                                     state.step, state.lr_multiplier, last)
        if message is not None:
            apply_lr(self.optimizer, self.schedule.multiplier(state.step))
            rates = ", ".join(f"{name} {lr:.3g}" for name, lr in group_lrs(self.optimizer).items())
            get_logger().warning(f"{message} (learning rates at step {state.step + 1}: {rates})")
        if state is None:
            return Progress()
        same_world = state.world_size == info.world_size
        if state.loader:
            self.loader.load_state_dict(state.loader[info.rank] if same_world else state.loader[0])
        if state.rng:
            ckpt.restore_rng_state(state.rng[info.rank] if same_world else state.rng[0], info.device)
        return Progress(step=state.step, tokens_seen=state.tokens_seen, start_step=state.step)

    def prepare_run_dir(self, step: int) -> None:
        """Rank 0 readies the run folder for a run continuing at `step`; every rank waits for it."""
        cfg, run_dir = self.cfg, self.cfg.run_dir
        if self.info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_stale_temporaries(run_dir)
            resume_dir = self.start.resume_dir
            if resume_dir is not None and resume_dir.parent.resolve() == run_dir.resolve():
                ckpt.log_superseded(ckpt.supersede_newer(run_dir, step))
            self.metrics.truncate_after(step)
            write_json_atomic(run_dir / "config.json", {"train": cfg.to_dict(), "model": self.model_config.to_dict()})
            # the launch is accepted (start point found, data and model built, run lock held): record it
            launch.publish_launch_record(cfg)
            if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
                self.tokenizer.save(run_dir / "tokenizer")
        barrier()
        get_logger().info(f"Run folder: {run_dir}")

    def train_state(self, progress: Progress) -> TrainState:
        """The TrainState of a checkpoint at `progress.step` (a collective: every rank calls it)."""
        cfg = self.cfg
        return TrainState(
            step=progress.step,
            tokens_seen=progress.tokens_seen,
            lr_multiplier=self.schedule.multiplier(progress.step),
            world_size=self.info.world_size,
            loader=all_gather_objects(self.loader.state_dict()),
            rng=all_gather_objects(ckpt.capture_rng_state(self.info.device)),
            model_kind=model_kind_of(self.model_config),
            model_config=self.model_config.to_dict(),
            recipe=cfg.recipe,
            preset=cfg.preset,
            data_format=self.spec.data_format,
            time=time.time(),
        )

    def save(self, progress: Progress) -> Path | None:
        """Write the checkpoint of `progress.step` (rank 0 writes; all ranks gather); its folder on rank 0."""
        model_sd, optim_sd = full_state_dicts(self.raw_model, self.optimizer, self.cfg.fsdp)
        state = self.train_state(progress)
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.cfg.run_dir, progress.step, model_state=model_sd,
                                        optimizer_state=optim_sd, state=state.to_dict(), keep_last=self.cfg.keep_last)
            get_logger().info(f"Saved checkpoint {path}")
        barrier()
        return path

    def finish(self, progress: Progress) -> None:
        """Rank 0: the loss curve and the closing line."""
        if not self.info.is_main:
            return
        from ghostvis_core.train.plot import plot_loss

        cfg = self.cfg
        self.metrics.close()
        plot = plot_loss(self.metrics.path, cfg.run_dir / "loss.png", title=f"{cfg.recipe} / {cfg.run}")
        curve = f"; loss curve {plot}" if plot is not None else ""
        get_logger().info(f"Done: {progress.step} steps, last loss {progress.last_loss:.4f}; checkpoint "
                          f"{progress.last_saved}{curve}")


def build_run_model_config(cfg: TrainConfig, tokenizer, start: setup.StartPoint, spec: RecipeSpec) -> ModelConfig:
    """The run's model config: a GPTConfig, or for a VLM recipe a VLMConfig around it; checked against a
    resumed checkpoint."""
    model_config = setup.build_model_config(cfg, tokenizer.vocab_size, start)
    if spec.model_kind == "vlm":
        model_config = setup.build_vlm_config(cfg, model_config, tokenizer.image_id, start)
    if start.resume_state is not None:
        if spec.model_kind == "vlm":
            setup.check_vlm_resume_compatible(model_config, start.resume_state, start.resume_dir)
        else:
            setup.check_resume_compatible(model_config, start.resume_state, start.resume_dir)
    return model_config


def build_run(cfg: TrainConfig, info: DistInfo) -> TrainingRun:
    """Everything before step 0: start point, tokenizer, model, optimizer, data and loader (weights not loaded yet)."""
    log = get_logger()
    if cfg.fsdp:
        check_fsdp(info)  # before the dataset and model are built
    backends = open_log_backends(cfg.log_to, cfg.run_dir, cfg.run, cfg.to_dict())  # a missing package: refused now
    grad_accum = cfg.grad_accum_steps(info.world_size)
    tokens_per_step = cfg.total_tokens_per_step(info.world_size)
    start = setup.find_start(cfg)
    spec = start.spec or spec_for(cfg.recipe)
    tokenizer = setup.load_tokenizer(cfg, start)
    model_config = build_run_model_config(cfg, tokenizer, start, spec)
    freeze = parse_freeze(spec.freeze if cfg.freeze is None else cfg.freeze)
    plan, raw_model, model, optimizer = build_model_and_optimizer(cfg, model_config, info, freeze)
    text = text_config(model_config)
    log.info(f"Model: preset {cfg.preset}, {raw_model.num_params() / 1e6:.2f}M parameters, language model "
             f"{text.n_layer} layers x {text.n_embd}, vocab {text.vocab_size}"
             + (f"; tower {model_config.vision.num_layers} layers x {model_config.vision.hidden_size}, "
                f"{model_config.num_image_tokens} tokens per image" if spec.model_kind == "vlm" else ""))
    log.info(f"Batch: {cfg.device_batch_size} rows x {cfg.pack_max_length} tokens x {info.world_size} rank(s) x "
             f"{grad_accum} accumulation step(s) = {tokens_per_step:,} tokens per step")
    if cfg.log_to:
        log.info(f"Metrics: {backends.describe()}")
    vision = model_config.vision if spec.model_kind == "vlm" else None
    _, loader = setup.build_data(cfg, tokenizer, spec, info, vision)
    loader = DevicePrefetcher(loader, info.device)  # batches arrive on the device, the next copy in flight
    return TrainingRun(
        cfg=cfg, info=info, spec=spec, start=start, tokenizer=tokenizer, model_config=model_config,
        plan=plan, raw_model=raw_model, model=model, optimizer=optimizer, loader=loader, grad_accum=grad_accum,
        tokens_per_step=tokens_per_step, metrics=MetricsLog(cfg.run_dir / "metrics.jsonl", backends),
        printer=ProgressPrinter(cfg.num_steps, enabled=info.is_main),
        flops_per_token=raw_model.flops_per_token(cfg.pack_max_length), peak_flops=peak_flops(info.device),
        flops_per_image=raw_model.flops_per_image() if spec.model_kind == "vlm" else 0.0,
        schedule=LRSchedule(num_steps=cfg.num_steps, warmup_steps=cfg.warmup_steps, warmdown_frac=cfg.warmdown_frac),
    )


def load_start_weights(raw_model: torch.nn.Module, optimizer, start: setup.StartPoint) -> None:
    """The start point's weights into the built model: a resumed checkpoint (with the optimizer), or init
    weights (a checkpoint of the same kind whole; a text checkpoint or HF Llama folder into a VLM's language
    model), then vision.init_from's tower."""
    if start.resume_dir is not None:
        restore_model_and_optimizer(raw_model, optimizer, start.resume_dir, with_optimizer=True)
        return
    lm = language_model(raw_model)
    if start.hf_text_weights is not None:
        load_weights_into(lm, start.hf_text_weights, start.init_dir)
        start.hf_text_weights = None  # the tensors are in the model now; do not keep a second copy
    elif start.init_dir is not None:
        target = raw_model if start.base_kind == model_kind_of(raw_model.config) else lm
        ckpt.load_model_weights(target, start.init_dir)
    if start.vision_weights is not None:
        load_weights_into(raw_model.vision_tower, start.vision_weights, "vision.init_from")
        start.vision_weights = None


def load_weights_into(module: torch.nn.Module, tensors: dict, source) -> None:
    """A full state dict read from `source` into a (maybe FSDP2-sharded) module, keys and shapes checked."""
    ckpt.check_model_state(module.state_dict(), tensors, Path(str(source)))
    load_full_model_state(module, tensors)


def restore_model_and_optimizer(raw_model: torch.nn.Module, optimizer, step_dir: Path, *, with_optimizer: bool) -> None:
    """Load checkpoint weights (and optimizer state) into the built model: one path for one process, DDP and
    FSDP2. Every rank reads the same full tensors; where the model is sharded each keeps its own shard."""
    ckpt.load_model_weights(raw_model, step_dir)
    if with_optimizer:
        optimizer.load_state_dict(shard_optimizer_state(optimizer, ckpt.load_optimizer_state(step_dir)))


def full_state_dicts(raw_model: torch.nn.Module, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with full (unsharded) tensors, for the rank-0 writer.

    FSDP2 gathers every sharded tensor (a collective: every rank calls this) into the same format DDP saves,
    so a checkpoint does not depend on the layout that wrote it.
    """
    if fsdp:
        return gather_full_model_state(raw_model), gather_full_optimizer_state(optimizer)
    return raw_model.state_dict(), optimizer.state_dict()
