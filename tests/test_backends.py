"""Backend choices per machine profile: which implementation serves each case, and the reason given."""

import logging

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env

from ghostvis_core import backends
from ghostvis_core.backends import ATTENTION_CASES, BackendPlan, plan_backends
from ghostvis_core.doctor_checks import run_checks
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.log import reset_log_once
from ghostvis_core.plan_banner import format_banner, log_plan


def _attn(plan: BackendPlan) -> dict[str, str]:
    return {case: plan.attention[case].backend for case in ATTENTION_CASES}


def test_h100_with_flash_attn():
    plan = plan_backends(make_env("h100", flash_attn="2.8.3"))
    assert plan.device_type == "cuda"
    assert _attn(plan) == {
        "dense": "sdpa_cudnn",
        "packed": "flash_attn",
        "decode": "triton",  # measured faster than FA2's kvcache kernel at every batch (attention_preferences)
        "prefill": "flash_attn",  # FA2 reads only each row's slots
        "noncausal": "sdpa_cudnn",
    }
    assert plan.attention["dense"].label == "SDPA/cuDNN"
    assert plan.attention["dense"].reason == "fastest dense causal on Hopper"
    assert plan.attention["packed"].label == "FlashAttention-2 2.8.3 varlen"
    assert plan.attention["decode"].label == "Triton split-KV decode"
    assert plan.attention["prefill"].label == "FlashAttention-2 2.8.3 kvcache"
    assert (plan.rms_norm.backend, plan.swiglu.backend) == ("triton", "triton")
    assert plan.optimizer.backend == "muon"
    assert plan.optimizer.label == "torch fused AdamW + Muon"
    assert plan.inference.backend == "native"
    assert plan.inference.reason == "preallocated KV cache"


def test_h100_without_flash_attn_uses_flex_for_packed():
    plan = plan_backends(make_env("h100"))
    assert _attn(plan) == {
        "dense": "sdpa_cudnn",
        "packed": "flex",
        "decode": "triton",
        "prefill": "sdpa_efficient",
        "noncausal": "sdpa_cudnn",
    }
    assert "flash-attn is not installed: `ghostvis install flash-attn`" in plan.attention["packed"].reason
    assert plan.attention["packed"].label == "FlexAttention (document mask)"


def test_h100_packed_without_triton_falls_back_to_efficient_mask():
    plan = plan_backends(make_env("h100", triton=None))
    assert plan.attention["packed"].backend == "sdpa_efficient"
    assert plan.attention["packed"].label == "SDPA/efficient + block-diagonal mask"
    assert plan.rms_norm.backend == "torch"
    assert "triton is not installed" in plan.rms_norm.reason
    # the masked per-row cache: SDPA's flash/cuDNN kernels take no mask
    assert plan.attention["decode"].backend == "sdpa_efficient"
    assert "The Triton decode kernel needs Triton" in plan.attention["decode"].reason
    assert plan.attention["prefill"].backend == "sdpa_efficient"


def test_decode_kernel_needs_a_power_of_two_head_dim():
    plan = plan_backends(make_env("h100", flash_attn="2.8.3"), head_dim=96)
    assert plan.attention["decode"].backend == "flash_attn"
    assert "power-of-two head_dim, got 96" in plan.attention["decode"].reason


def test_a100_and_4090_prefer_fa2_when_installed():
    for profile in ("a100", "rtx4090"):
        plan = plan_backends(make_env(profile, flash_attn="2.8.3"))
        assert set(_attn(plan).values()) == {"flash_attn"}, profile
    plan = plan_backends(make_env("a100"))
    assert _attn(plan) == {
        "dense": "sdpa_flash",
        "packed": "flex",
        "decode": "triton",
        "prefill": "sdpa_efficient",
        "noncausal": "sdpa_flash",
    }
    assert "`ghostvis install flash-attn`" in plan.attention["dense"].reason


def test_use_flash_attn_false_skips_fa2_with_reason():
    plan = plan_backends(make_env("a100", flash_attn="2.8.3"), use_flash_attn=False)
    assert plan.attention["dense"].backend == "sdpa_flash"
    assert "use_flash_attn=False" in plan.attention["dense"].reason


@pytest.mark.parametrize("profile,sm", [("v100", "sm70"), ("t4", "sm75")])
def test_pre_ampere(profile, sm):
    plan = plan_backends(make_env(profile, flash_attn="2.8.3"))
    assert _attn(plan) == {
        "dense": "sdpa_efficient",
        "packed": "flex",
        "decode": "triton",
        "prefill": "sdpa_efficient",
        "noncausal": "sdpa_efficient",
    }
    assert (
        f"FlashAttention-2 needs an Ampere (sm80) or newer GPU; this is {sm}"
        in plan.attention["dense"].reason
    )
    assert plan.rms_norm.backend == "triton"
    with pytest.raises(BackendUnavailableError, match="needs an Ampere"):
        plan_backends(make_env(profile, flash_attn="2.8.3"), attn="flash")


@pytest.mark.parametrize("profile", ["t4", "v100", "cpu", "h100"])
def test_vllm_installed_here_is_reported_as_what_serves_backend_vllm(profile):
    # the model's plan stays native (vLLM is another engine, chosen by --backend); the doctor says what uses it
    env = make_env(profile, vllm="0.32.0")
    assert plan_backends(env).inference.backend == "native"
    vllm = next(c for c in run_checks(env).checks if c.name == "vllm")
    if profile == "v100":
        assert "compute capability 7.5" in vllm.detail and not vllm.satisfied
    else:
        assert vllm.detail == "vllm 0.32.0 (usable; serves `ghostvis infer/bench --backend vllm` (and auto))"


def test_blackwell():
    plan = plan_backends(make_env("b200", flash_attn="2.8.3"))
    assert _attn(plan) == {
        "dense": "sdpa_cudnn",
        "packed": "flex",
        "decode": "triton",
        "prefill": "sdpa_efficient",
        "noncausal": "sdpa_cudnn",
    }
    assert "not built for Blackwell (sm100)" in plan.attention["dense"].reason


def test_cpu_only():
    plan = plan_backends(make_env("cpu"))
    assert plan.device_type == "cpu"
    assert set(_attn(plan).values()) == {"sdpa_math"}
    assert "block-diagonal causal mask" in plan.attention["packed"].reason
    assert plan.rms_norm.backend == plan.swiglu.backend == "torch"
    assert plan.rms_norm.reason == "Triton kernels need a CUDA GPU"
    assert plan.optimizer.label == "torch AdamW + Muon"
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        plan_backends(make_env("cpu"), attn="flash")
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is visible"):
        plan_backends(make_env("cpu"), device_type="cuda")


def test_cpu_triton_only_under_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        plan_backends(make_env("cpu"), norm="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    plan = plan_backends(make_env("cpu"), norm="triton")
    assert plan.rms_norm.backend == plan.swiglu.backend == "triton"
    assert "interpreter" in plan.rms_norm.reason
    # auto never picks the interpreter: it is for tests only.
    assert plan_backends(make_env("cpu")).rms_norm.backend == "torch"


def test_windows_gpu():
    plan = plan_backends(make_env("windows_gpu"))
    assert plan.attention["dense"].backend == "sdpa_flash"
    assert plan.attention["packed"].backend == "sdpa_efficient"  # Flex needs Triton, absent on Windows
    assert plan.rms_norm.backend == "torch"
    assert plan.inference.backend == "native"


def test_flash_attn_undefined_symbol_is_diagnosed():
    env = make_env("h100", flash_attn_error=FA2_UNDEFINED_SYMBOL)
    fa = env.package("flash_attn")
    assert not fa.usable
    assert fa.diagnosis.startswith("built against another torch (undefined symbol)")
    assert "ghostvis install flash-attn" in fa.diagnosis
    plan = plan_backends(env)
    assert plan.attention["packed"].backend == "flex"
    assert "built against another torch" in plan.attention["packed"].reason
    with pytest.raises(BackendUnavailableError, match="built against another torch"):
        plan_backends(env, attn="flash")


def test_fa2_float32_not_eligible():
    plan = plan_backends(make_env("a100", flash_attn="2.8.3"), dtype="float32")
    assert plan.attention["dense"].backend == "sdpa_efficient"
    assert "fp16/bf16, not float32" in plan.attention["dense"].reason


def test_fa2_head_dim_rules():
    plan = plan_backends(make_env("a100", flash_attn="2.8.3"), head_dim=100)
    assert plan.attention["dense"].backend == "sdpa_efficient"
    assert "multiple of 8, not 100" in plan.attention["dense"].reason


def test_explicit_attention_request_per_case():
    plan = plan_backends(make_env("h100", flash_attn="2.8.3"), attn="cudnn")
    assert plan.attention["dense"].backend == "sdpa_cudnn"
    assert plan.attention["dense"].reason == "requested"
    # cuDNN SDPA has no packed-document mode: that case gets the auto choice and says why.
    assert plan.attention["packed"].backend == "flash_attn"
    assert "SDPA/cuDNN has no packed mode" in plan.attention["packed"].reason


def test_use_fused_kernels_false():
    plan = plan_backends(make_env("h100"), use_fused_kernels=False)
    assert plan.rms_norm.backend == plan.swiglu.backend == "torch"
    assert plan.rms_norm.reason == "use_fused_kernels=False in the config"


def test_apex_norm_and_adam():
    env = make_env("h100", apex="0.1")
    assert plan_backends(env).rms_norm.backend == "triton"  # auto never prefers apex (measured slower)
    plan = plan_backends(env, norm="apex", optimizer="apex_adam")
    assert plan.rms_norm.backend == "apex"
    assert plan.optimizer.backend == "apex_adam"
    assert "no faster than torch fused AdamW" in plan.optimizer.reason
    broken = make_env("h100", apex="0.1", apex_ext=False)
    with pytest.raises(BackendUnavailableError, match="fused_layer_norm_cuda"):
        plan_backends(broken, norm="apex")
    with pytest.raises(BackendUnavailableError, match="ghostvis install apex"):
        plan_backends(make_env("h100"), optimizer="apex_adam")


def test_optimizer_without_muon():
    plan = plan_backends(make_env("h100", muon=False, torch_version="2.8.0+cu128"))
    assert plan.optimizer.backend == "adamw"
    assert "has no torch.optim.Muon" in plan.optimizer.reason
    with pytest.raises(BackendUnavailableError, match="torch.optim.Muon"):
        plan_backends(make_env("h100", muon=False), optimizer="muon")


def test_bad_request_names_are_config_errors():
    with pytest.raises(ConfigError, match="attn_backend='fast'"):
        plan_backends(make_env("h100"), attn="fast")
    with pytest.raises(ConfigError, match="norm_backend"):
        plan_backends(make_env("h100"), norm="liger")


def test_an_inference_banner_names_no_optimizer():
    from ghostvis_core.backends import inference_run_facts, plan_run

    env = make_env("h100", flash_attn="2.8.3")
    text = format_banner(plan_run(env, inference_run_facts(env, dtype="bfloat16")))
    assert "Optimizer:" not in text and "Inference: GhostVis engine" in text
    assert "decode Triton split-KV decode" in text
    assert "Optimizer: torch fused AdamW + Muon" in format_banner(plan_backends(env))  # a training plan does


def test_banner_shape():
    text = format_banner(plan_backends(make_env("h100", flash_attn="2.8.3")))
    lines = text.splitlines()
    assert lines[0] == "=== GhostVis backends ==="
    assert lines[1].startswith(
        "Attention: dense SDPA/cuDNN (fastest dense causal on Hopper); packed FlashAttention-2 2.8.3 varlen"
    )
    assert lines[2].startswith("RMSNorm, SwiGLU: Triton fused kernels")
    assert lines[3].startswith("Optimizer: torch fused AdamW + Muon")
    assert lines[4].startswith("Inference: GhostVis engine")


def test_log_plan_logs_the_banner_once_per_process(caplog, monkeypatch):
    reset_log_once()
    eager = plan_backends(make_env("cpu"), dtype="float32", norm="torch")
    assert eager.rms_norm.reason == "requested"
    with caplog.at_level(logging.INFO, logger="ghostvis"):
        log_plan(eager)
        log_plan(plan_backends(make_env("h100")))
    messages = [r.message for r in caplog.records]
    assert messages.count("=== GhostVis backends ===") == 1
    assert messages[-1] == "Run: cpu, float32, eager, 1 process(es)"


def test_plan_to_dict_roundtrip_keys():
    d = plan_backends(make_env("t4")).to_dict()
    assert set(d) == {
        "device_type", "dtype", "compiled", "world_size", "attention", "rms_norm", "swiglu", "optimizer", "inference",
        "fp8", "activation_checkpointing", "decode_layers",
    }
    assert set(d["attention"]) == set(ATTENTION_CASES)
    assert d["attention"]["dense"]["label"] == "SDPA/efficient"


def test_compiled_plan_keeps_norm_and_swiglu_in_torch():
    env = make_env("h100")
    eager = plan_backends(env)
    assert (eager.rms_norm.backend, eager.swiglu.backend) == ("triton", "triton")
    compiled = plan_backends(env, compiled=True)
    assert (compiled.rms_norm.backend, compiled.swiglu.backend) == ("torch", "torch")
    assert compiled.rms_norm.reason == backends.COMPILED_NORM_REASON
    assert "231.5 vs 242.2 ms" in compiled.swiglu.reason
    assert "RMSNorm, SwiGLU: PyTorch" in format_banner(compiled)
    # an explicit request is honoured under compile too; no Triton means the Triton reason, not the compile one
    assert plan_backends(env, norm="triton", compiled=True).rms_norm.reason == "requested"
    no_triton = plan_backends(make_env("h100", triton=None), compiled=True)
    assert no_triton.rms_norm.backend == "torch" and "triton" in no_triton.rms_norm.reason
