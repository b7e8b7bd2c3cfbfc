"""`ghostvis doctor`: checks, backend choices, JSON output and exit codes."""

import json

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env, run_cli

from ghostvis_core import env as env_mod
from ghostvis_core.backends import ATTENTION_CASES
from ghostvis_core.doctor_checks import GROUPS, parse_requirements, run_checks
from ghostvis_core.errors import ConfigError


def test_doctor_json_on_this_machine(capsys, monkeypatch):
    """The real probe: JSON only on stdout, the facts of this interpreter, every check in a known group."""
    import platform

    import torch

    monkeypatch.delenv(env_mod.PROFILE_ENV_VAR, raising=False)
    code, out, _ = run_cli(["doctor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)  # stdout is JSON only
    assert data["facts"]["torch_version"] == torch.__version__
    assert data["facts"]["python"] == platform.python_version()
    assert [c["name"] for c in data["checks"]][:3] == ["python", "os", "cpu"]
    assert {c["group"] for c in data["checks"]} <= set(GROUPS)
    assert set(data["backends"]["attention"]) == set(ATTENTION_CASES)
    assert data["exit_code"] == 0 and data["blocking"] == []


# (check name, status) of each line, in order, written out for fixed profiles. GHOSTVIS_HOME (set by the
# autouse fixture) and the hand-built profile (GHOSTVIS_ENV_PROFILE) each get a line of their own.
CPU_CHECKS = [
    ("python", "ok"), ("os", "ok"), ("cpu", "ok"), ("cuda", "warn"), ("torch", "warn"), ("nvcc", "ok"),
    ("ninja", "ok"), ("triton", "warn"), ("flash-attn", "warn"), ("vllm", "ok"), ("apex", "warn"),
    ("liger", "warn"), ("muon", "ok"), ("flex_attention", "ok"), ("GHOSTVIS_HOME", "ok"), ("data", "ok"),
    ("runs", "ok"), ("cache", "ok"), ("env profile", "warn"),
]  # fmt: skip
H100_CHECKS = [
    ("python", "ok"), ("os", "ok"), ("cpu", "ok"), ("gpu0", "ok"), ("driver", "ok"), ("torch", "ok"),
    ("cudnn", "ok"), ("nccl", "ok"), ("nvcc", "ok"), ("ninja", "ok"), ("triton", "ok"), ("flash-attn", "ok"),
    ("vllm", "ok"), ("apex", "ok"), ("liger", "ok"), ("muon", "ok"), ("flex_attention", "ok"),
    ("GHOSTVIS_HOME", "ok"), ("data", "ok"), ("runs", "ok"), ("cache", "ok"),
    ("env profile", "warn"),
]  # fmt: skip


def test_doctor_json_on_cpu_profile(use_profile, capsys):
    use_profile(make_env("cpu"))
    code, out, _ = run_cli(["doctor", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["exit_code"] == 0 and data["blocking"] == []
    assert [(c["name"], c["status"]) for c in data["checks"]] == CPU_CHECKS
    assert data["facts"]["torch_version"] == "2.13.0+cpu" and data["facts"]["gpus"] == []
    backends = data["backends"]
    assert backends["device_type"] == "cpu"
    assert {case: c["backend"] for case, c in backends["attention"].items()} == {
        "dense": "sdpa_math", "packed": "sdpa_math", "decode": "sdpa_math", "prefill": "sdpa_math",
        "noncausal": "sdpa_math",
    }  # fmt: skip
    assert [backends[k]["backend"] for k in ("rms_norm", "swiglu", "optimizer", "inference")] == [
        "torch", "torch", "muon", "native",
    ]  # fmt: skip
    assert data["verdict"].startswith("Ready on CPU only")


def test_doctor_json_on_h100_profile(use_profile, capsys):
    use_profile(make_env("h100", flash_attn="2.8.3", apex="0.1", liger="0.6.0"))
    code, out, _ = run_cli(["doctor", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["exit_code"] == 0 and data["blocking"] == []
    assert [(c["name"], c["status"]) for c in data["checks"]] == H100_CHECKS
    attention = {case: c["backend"] for case, c in data["backends"]["attention"].items()}
    # cuDNN for dense causal rows; FlashAttention-2 varlen for packed rows (no mask materialized).
    assert attention["dense"] == "sdpa_cudnn" and attention["packed"] == "flash_attn"
    assert data["verdict"].startswith("Ready on 1 x NVIDIA H100 80GB HBM3")


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


def test_doctor_json_package_usable_agrees_with_its_check(use_profile, capsys):
    """On a CPU machine triton imports (facts say installed) but its kernels cannot run here: the JSON's
    `usable` says what the check says, not merely that the import worked; on an H100 both say usable."""
    use_profile(make_env("cpu"))
    data = json.loads(run_cli(["doctor", "--json"], capsys)[1])
    triton = next(c for c in data["checks"] if c["name"] == "triton")
    assert triton["status"] == "warn" and "unavailable here" in triton["detail"]
    assert data["facts"]["packages"]["triton"]["installed"] is True
    assert data["facts"]["packages"]["triton"]["usable"] is False
    use_profile(make_env("h100", flash_attn="2.8.3"))
    data = json.loads(run_cli(["doctor", "--json"], capsys)[1])
    assert data["facts"]["packages"]["triton"]["usable"] is True
    assert data["facts"]["packages"]["flash_attn"]["usable"] is True


def test_doctor_names_an_unwritable_home_instead_of_ok(use_profile, capsys, tmp_path, monkeypatch):
    """GHOSTVIS_HOME on a file: data and runs fail with the path and the fix (no "ok", and no free-space line
    about a place nothing can be written)."""
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("GHOSTVIS_HOME", str(home))
    use_profile(make_env("cpu"))
    data = json.loads(run_cli(["doctor", "--json"], capsys)[1])
    paths = {c["name"]: c for c in data["checks"] if c["group"] == "Paths"}
    assert paths["data"]["status"] == "fail" and paths["runs"]["status"] == "fail"
    assert str(home) in paths["data"]["detail"] and "GHOSTVIS_HOME" in paths["data"]["fix"]
    assert "free" not in paths["runs"]["detail"]
