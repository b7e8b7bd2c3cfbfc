"""One plan per run: `ghostvis doctor` shows the plan the trainer builds, on every machine profile."""

import pytest
from conftest import make_env

from ghostvis_core.backends import default_device_type
from ghostvis_core.doctor_checks import run_checks
from ghostvis_core.model_configs import get_preset
from ghostvis_core.plan_banner import format_banner
from ghostvis_core.train.config import TrainConfig
from ghostvis_core.train.run_plan import plan_for_training

PROFILES = {
    "h100+fa2": dict(profile="h100", flash_attn="2.8.3"),
    "h100": dict(profile="h100"),
    "a100+fa2": dict(profile="a100", flash_attn="2.8.3"),
    "t4": dict(profile="t4"),
    "b200": dict(profile="b200", flash_attn="2.8.3"),
    "cpu": dict(profile="cpu"),
}


@pytest.mark.parametrize("name", list(PROFILES))
def test_doctor_plan_equals_the_trainers_plan(name):
    kw = dict(PROFILES[name])
    env = make_env(kw.pop("profile"), **kw)
    cfg = TrainConfig()  # every default, as `ghostvis train base_train` with no flags
    model_config = get_preset(cfg.preset, vocab_size=cfg.vocab_size)  # the preset sized to the tokenizer
    device = default_device_type(env)
    trainer = plan_for_training(cfg, env, device, 1, model_config)
    doctor = run_checks(env).plan
    assert doctor == trainer
    assert format_banner(doctor) == format_banner(trainer)
    # the defaults a training run gets: compiled and bf16 on CUDA, eager fp32 on CPU
    on_gpu = device == "cuda"
    assert (trainer.compiled, trainer.dtype) == ((True, "bfloat16") if on_gpu else (False, "float32"))
    if on_gpu and trainer.rms_norm.backend == "torch":
        # under torch.compile auto keeps the norms in PyTorch, and the banner says so (one line, no contradiction)
        assert "RMSNorm, SwiGLU: PyTorch" in format_banner(trainer)


def test_explicit_settings_reach_the_plan_the_same_way():
    env = make_env("h100", flash_attn="2.8.3")
    cfg = TrainConfig(compile=False, dtype="float32")
    cfg.optim.backend = "adamw"
    plan = plan_for_training(cfg, env, "cuda", 2, get_preset("tiny", norm_backend="torch"))
    facts = plan.facts
    assert (facts.compiled, facts.dtype, facts.world_size, facts.optimizer) == (False, "float32", 2, "adamw")
    assert plan.rms_norm.reason == "requested" and plan.optimizer.backend == "adamw"
    assert {c.backend for c in plan.attention.values()} <= {"sdpa_efficient", "flex", "sdpa_math", "triton"}  # fp32-capable


def test_doctor_shows_the_inference_plan_in_bf16_on_cuda():
    report = run_checks(make_env("h100"))
    # the decode step is compiled on CUDA by default (a one-shot --prompt passes compile=False)
    assert report.inference_plan.dtype == "bfloat16" and report.inference_plan.compiled
    assert report.inference_plan.inference.backend == "native"
    cpu = run_checks(make_env("cpu")).inference_plan
    assert cpu.dtype == "float32" and cpu.device_type == "cpu" and not cpu.compiled
