"""The dtype is part of the plan; one vocabulary of backend names; one table of hardware limits."""

import pytest
from conftest import make_env

from ghostvis_core import backend_names, config
from ghostvis_core.attention_preferences import CASES_SUPPORTED
from ghostvis_core.backends import RunFacts, inference_run_facts, plan_backends, plan_run
from ghostvis_core.config import GPTConfig, OptimizerConfig
from ghostvis_core.doctor_checks import run_checks
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.hardware_limits import LIMITS, arch_unavailable, peak_bf16_flops
from ghostvis_core.install_plan import plan_install
from ghostvis_core.kernels import dispatch
from ghostvis_core.train import metrics

HALF_ONLY = {"flash_attn", "sdpa_flash", "sdpa_cudnn"}
GPU_PROFILES = [
    ("h100", "2.8.3"),
    ("h100", None),
    ("a100", "2.8.3"),
    ("t4", None),
    ("b200", "2.8.3"),
    ("v100", None),
]


# ---------------------------------------------------------------------------------------------------------
# dtype


@pytest.mark.parametrize(("profile", "fa2"), GPU_PROFILES)
def test_fp32_cuda_plan_never_picks_a_half_only_kernel(profile, fa2):
    env = make_env(profile, flash_attn=fa2)
    for facts in (
        RunFacts("cuda", "float32"),
        RunFacts("cuda", "float32", compiled=True, head_dim=64),
        inference_run_facts(env, GPTConfig(n_layer=1, n_head=4, n_embd=512), dtype="float32"),
    ):
        plan = plan_run(env, facts)
        chosen = {case: c.backend for case, c in plan.attention.items()}
        print(profile, fa2, facts.head_dim, chosen)
        assert not HALF_ONLY & set(chosen.values()), chosen
        assert set(chosen.values()) <= {"sdpa_efficient", "flex", "sdpa_math", "triton"}  # triton: fp32 inside


def test_bf16_h100_does_pick_half_only_kernels():
    plan = plan_run(make_env("h100", flash_attn="2.8.3"), RunFacts("cuda", "bfloat16"))
    assert {c.backend for c in plan.attention.values()} == {"sdpa_cudnn", "flash_attn", "triton"}
    # the Triton decode kernel computes in fp32 from any cache dtype: it serves fp32 plans as well
    fp32 = plan_run(make_env("h100"), RunFacts("cuda", "float32"))
    assert fp32.attention["decode"].backend == "triton"
    # without Triton, decode over the per-row masked cache runs SDPA's efficient kernel (any dtype)
    no_triton = plan_run(make_env("h100", flash_attn="2.8.3", triton=None), RunFacts("cuda", "float32"))
    assert no_triton.attention["decode"].backend == "sdpa_efficient"
    assert "The Triton decode kernel needs Triton" in no_triton.attention["decode"].reason


def test_explicit_half_only_request_in_fp32_raises():
    env = make_env("h100", flash_attn="2.8.3")
    for attn in ("flash", "cudnn", "sdpa_flash"):
        with pytest.raises(BackendUnavailableError, match="runs only in fp16/bf16, not float32"):
            plan_backends(env, dtype="float32", attn=attn)


def test_inference_dtype_auto_is_bf16_on_cuda_fp32_on_cpu():
    assert inference_run_facts(make_env("h100")).dtype == "bfloat16"
    assert inference_run_facts(make_env("cpu")).dtype == "float32"
    assert inference_run_facts(make_env("h100"), dtype="float32").dtype == "float32"
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        inference_run_facts(make_env("h100"), dtype="fp8")


# ---------------------------------------------------------------------------------------------------------
# vocabulary


def _gpt(**kw) -> GPTConfig:
    return GPTConfig(n_layer=1, n_head=2, n_embd=64, **kw)


def test_config_and_planner_accept_the_same_requests():
    assert config.ATTN_REQUESTS is backend_names.ATTN_REQUESTS
    for name in backend_names.ATTN_REQUESTS:
        _gpt(attn_backend=name)
        RunFacts("cpu", "float32", attn=name)
    for name in backend_names.NORM_REQUESTS:
        _gpt(norm_backend=name)
        RunFacts("cpu", "float32", norm=name)
    for name in backend_names.OPTIMIZER_REQUESTS:
        OptimizerConfig(backend=name)
        RunFacts("cpu", "float32", optimizer=name)
    for bad in ("fa3", "liger", "sgd"):
        with pytest.raises(ConfigError):
            _gpt(attn_backend=bad)
        with pytest.raises(ConfigError):
            RunFacts("cpu", "float32", attn=bad)
        with pytest.raises(ConfigError):
            _gpt(norm_backend=bad)
        with pytest.raises(ConfigError):
            RunFacts("cpu", "float32", norm=bad)
        with pytest.raises(ConfigError):
            OptimizerConfig(backend=bad)
        with pytest.raises(ConfigError):
            RunFacts("cpu", "float32", optimizer=bad)


def test_every_request_names_a_backend_the_tables_know():
    backends = set(backend_names.ATTN_BACKENDS)
    assert set(backend_names.ATTN_REQUEST_TO_BACKEND.values()) - {None} == backends
    assert set(CASES_SUPPORTED) == backends
    assert backends <= set(LIMITS)
    # kernels take exactly the concrete names the planner can choose
    assert set(dispatch.RMS_NORM_BACKENDS) == set(backend_names.NORM_REQUESTS) - {"auto"}
    assert set(dispatch.SWIGLU_BACKENDS) == {"triton", "torch"}


# ---------------------------------------------------------------------------------------------------------
# hardware limits


def test_t4_refuses_flash_attn_install_with_the_planners_reason():
    env = make_env("t4", flash_attn="2.8.3")
    reason = arch_unavailable("flash_attn", env.capability)
    assert reason.kind == "arch"
    assert reason.message == "FlashAttention-2 needs an Ampere (sm80) or newer GPU; this is sm75"
    with pytest.raises(BackendUnavailableError) as info:
        plan_install("flash-attn", env)
    assert reason.message in str(info.value)
    with pytest.raises(BackendUnavailableError) as planned:
        plan_backends(env, attn="flash")
    assert reason.message in str(planned.value)
    fa2 = next(c for c in run_checks(env).checks if c.name == "flash-attn")
    assert reason.message in fa2.detail


def test_blackwell_and_v100_limits_agree_across_install_planner_and_doctor():
    b200 = make_env("b200", flash_attn="2.8.3")
    why = arch_unavailable("flash_attn", b200.capability).message
    assert why == "FlashAttention-2 is not built for Blackwell (sm100) in our wheels"
    with pytest.raises(BackendUnavailableError, match=r"not built for Blackwell \(sm100\)"):
        plan_install("flash-attn", b200)
    assert why in plan_backends(b200).attention["dense"].reason
    v100 = make_env("v100", vllm="0.32.0")
    vllm_why = arch_unavailable("vllm", v100.capability).message
    with pytest.raises(BackendUnavailableError) as info:
        plan_install("vllm", v100)
    assert vllm_why in str(info.value)
    vllm = next(c for c in run_checks(v100).checks if c.name == "vllm")
    assert vllm_why in vllm.detail


def test_one_peak_flop_table():
    assert peak_bf16_flops("NVIDIA H200") == peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None
    assert metrics.peak_bf16_flops is peak_bf16_flops


# ---------------------------------------------------------------------------------------------------------
# inference model in its plan's dtype (CPU)


def test_inference_model_parameters_take_the_plans_dtype_and_rope_stays_fp32():
    import torch
    from plans import cpu_gpt

    from ghostvis_core.engine import cast_parameters_
    from ghostvis_core.env import probe_env
    from ghostvis_core.gpt import GPT

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=50, sequence_len=32)
    state = cpu_gpt(cfg).state_dict()
    plan = plan_run(probe_env(), inference_run_facts(probe_env(), cfg, device_type="cpu", dtype="bfloat16"))
    model = GPT(cfg, plan)
    model.load_state_dict(state, strict=True)
    model = cast_parameters_(model, plan.dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32 and not model.training
    out = model.generate(torch.tensor([[1, 2, 3]]), 4)
    assert out.shape == (1, 7)
