"""The backend plan of a training run: its settings turned into RunFacts once, then planned once.

The trainer calls `plan_for_training`; `ghostvis doctor` calls `backends.training_run_facts` with a training
run's defaults, which is the same function this one calls, so both get the same plan on the same machine
(tests/test_plan_consistency.py).
"""

from __future__ import annotations

from ghostvis_core.backends import BackendPlan, plan_run, training_run_facts
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
    )
    return plan_run(env, facts)
