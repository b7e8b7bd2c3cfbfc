"""Backend plans for tests: the CPU plan a model or optimizer is built with (tests/plans.py)."""

from __future__ import annotations

from ghostvis_core.backends import BackendPlan, RunFacts, plan_run
from ghostvis_core.env import probe_env


def cpu_plan(config=None, dtype: str = "float32", compiled: bool = False, optimizer: str = "auto") -> BackendPlan:
    """The plan a CPU run of `config` (a GPTConfig, or None for the defaults) gets on this machine."""
    return device_plan(config, "cpu", dtype, compiled, optimizer)


def device_plan(config, device_type: str, dtype: str, compiled: bool = False, optimizer: str = "auto") -> BackendPlan:
    """The plan of a run of `config` on `device_type` ("cuda" in GPU tests) on this machine."""
    facts = RunFacts.for_training(config, optimizer, device_type, dtype, compiled, 1)
    return plan_run(probe_env(), facts)


def cpu_gpt(config, **plan_kw):
    """GPT(config, cpu_plan(config, **plan_kw)): a CPU model of `config` with its plan."""
    from ghostvis_core.gpt import GPT

    return GPT(config, cpu_plan(config, **plan_kw))


def cpu_optimizer(model, opt_config):
    """build_optimizer(model, opt_config, plan) with the CPU plan made for opt_config's backend request."""
    from ghostvis_core.optim import build_optimizer

    return build_optimizer(model, opt_config, cpu_plan(model.config, optimizer=opt_config.backend))
