"""`ghostvis doctor`: checks, backend choices, JSON output and exit codes."""

import json

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env, run_cli

from ghostvis_core import env as env_mod
from ghostvis_core.backends import ATTENTION_CASES
from ghostvis_core.doctor_checks import GROUPS, parse_requirements, run_checks
from ghostvis_core.errors import ConfigError


def test_doctor_json_on_this_machine(capsys, monkeypatch):
    monkeypatch.delenv(env_mod.PROFILE_ENV_VAR, raising=False)
    env_mod.reset_env_cache()
    code, out, _ = run_cli(["doctor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)  # stdout is JSON only
    facts = env_mod.probe_env()
    expected = run_checks(facts)
    assert [c["name"] for c in data["checks"]] == [c.name for c in expected.checks]
    assert {c["group"] for c in data["checks"]} <= set(GROUPS)
    assert set(data["backends"]["attention"]) == set(ATTENTION_CASES)
    for key in ("rms_norm", "swiglu", "optimizer", "inference"):
        assert data["backends"][key]["backend"] and data["backends"][key]["reason"]
    assert data["facts"]["torch_version"] == facts.torch_version
    assert data["exit_code"] == 0 and data["verdict"]
    env_mod.reset_env_cache()


def test_doctor_text_on_cpu_profile(use_profile, capsys):
    use_profile(make_env("cpu"))
    code, out, _ = run_cli(["doctor"], capsys)
    assert code == 0
    for group in GROUPS:
        assert group in out
    assert "[!]  cuda            no CUDA GPU" in out
    assert "FlashAttention-2 needs a CUDA GPU" in out
    assert "attention packed     SDPA/math + block-diagonal mask" in out
    assert out.strip().splitlines()[-1].startswith("Ready on CPU only")


def test_doctor_h100_broken_flash_attn(use_profile, capsys):
    use_profile(make_env("h100", flash_attn_error=FA2_UNDEFINED_SYMBOL))
    code, out, _ = run_cli(["doctor"], capsys)
    assert code == 0  # broken but not required: reported, not blocking
    assert "[x]  flash-attn" in out
    assert "built against another torch (undefined symbol)" in out
    assert "ghostvis install flash-attn" in out
    assert "attention dense      SDPA/cuDNN" in out
    code, out, _ = run_cli(["doctor", "--require", "flash-attn"], capsys)
    assert code == 1
    assert "Blocked: flash-attn" in out


def test_doctor_require(use_profile, capsys):
    use_profile(make_env("h100", flash_attn="2.8.3"))
    code, out, _ = run_cli(["doctor", "--require", "flash-attn,cuda,triton"], capsys)
    assert code == 0
    code, out, _ = run_cli(["doctor", "--json", "--require", "vllm"], capsys)
    assert code == 1
    assert json.loads(out)["blocking"] == ["vllm"]


def test_require_parsing():
    assert parse_requirements("flash-attn, vllm,GPU") == ["flash-attn", "vllm", "cuda"]
    with pytest.raises(ConfigError, match="unknown name\\(s\\) fa3; valid: flash-attn, triton"):
        parse_requirements("fa3")


def test_cpu_profile_requires_cuda_blocks():
    report = run_checks(make_env("cpu"), ["cuda", "triton"])
    assert report.exit_code == 1
    assert {c.name for c in report.blocking} == {"cuda", "triton"}


def test_doctor_shows_dotted_cudnn(use_profile, capsys):
    env = make_env("h100", flash_attn="2.8.3")
    env.cudnn = "8902"  # raw integer from an older profile: shown dotted all the same
    use_profile(env)
    code, out, _ = run_cli(["doctor"], capsys)
    assert code == 0
    assert "cuDNN 8.9.2" in out and "8902" not in out
