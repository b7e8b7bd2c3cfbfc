"""The backend plan of a training run: its settings turned into RunFacts once, then planned once.

The trainer calls `plan_for_training`; `ghostvis doctor` calls `backends.training_run_facts` with a training
run's defaults, which is the same function this one calls, so both get the same plan on the same machine
(tests/test_plan_consistency.py).
"""

from __future__ import annotations

from ghostvis_core.backends import BackendPlan, default_device_type, plan_run, training_run_facts
from ghostvis_core.config import GPTConfig
from ghostvis_core.env import EnvFacts
from ghostvis_core.train.config import TrainConfig


def plan_for_training(
    cfg: TrainConfig, env: EnvFacts, device_type: str, world_size: int, model_config: GPTConfig
) -> BackendPlan:
    """The plan for training `model_config` per `cfg` on `device_type` with `world_size` ranks."""
    facts = training_run_facts(
        env,
        model_config,
        device_type=device_type,
        compile=cfg.compile,
        dtype=cfg.dtype,
        optimizer=cfg.optim.backend,
        world_size=world_size,
        fp8=cfg.fp8,
        activation_checkpointing=cfg.activation_checkpointing,
        fsdp=cfg.fsdp,
    )
    return plan_run(env, facts)


def default_model_config(cfg: TrainConfig) -> GPTConfig:
    """The GPTConfig a fresh run of `cfg` trains (its preset, cfg.model overrides, the default vocab size)."""
    from ghostvis_core.model_configs import get_preset

    return get_preset(cfg.preset, **{"vocab_size": cfg.vocab_size, **cfg.model})


def default_training_plan(env: EnvFacts) -> BackendPlan:
    """The plan `ghostvis train` with every default gets on this machine (one process): what doctor shows."""
    cfg = TrainConfig()
    return plan_for_training(cfg, env, default_device_type(env), 1, default_model_config(cfg))
