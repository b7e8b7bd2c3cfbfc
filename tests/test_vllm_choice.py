"""Which engine `--backend native|vllm|auto` gets (engine_choice.choose_inference), what the doctor and the install
plan say about a separate vLLM environment, and the one-message refusals; no vLLM needed (hand-built facts)."""

from __future__ import annotations

import pytest
from helpers import make_env, run_cli

from ghostvis_core.doctor_checks import run_checks
from ghostvis_core.engine_choice import choose_inference
from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.install_plan import plan_install
from ghostvis_core.vllm_env import VllmEnvStatus, probe_vllm_env, record_vllm_venv, vllm_venv


def venv_status(usable: bool = True, found: bool = True, error: str | None = None) -> VllmEnvStatus:
    return VllmEnvStatus("/opt/vv", "given", found=found, vllm_version="0.32.0" if found else None,
                         importable=usable, same_ghostvis=usable, error=None if usable else error)


def test_auto_picks_vllm_only_when_usable_and_the_model_fits():
    cpu = make_env("cpu")
    chosen = choose_inference("auto", cpu, "cpu", venv=venv_status(), model=("gpt", 64))
    assert chosen.backend == "vllm" and chosen.label == "vLLM 0.32.0" and "/opt/vv" in chosen.reason
    missing = VllmEnvStatus("/opt/vv", "given", error="no vLLM environment at /opt/vv: run `ghostvis install vllm`")
    native = choose_inference("auto", cpu, "cpu", venv=missing, model=("gpt", 64))
    assert native.backend == "native" and "no vLLM environment at /opt/vv" in native.reason
    head16 = choose_inference("auto", cpu, "cpu", venv=venv_status(), model=("gpt", 16))
    assert head16.backend == "native" and "head_dim in [32, 64" in head16.reason and "is 16" in head16.reason
    vlm = choose_inference("auto", cpu, "cpu", venv=venv_status(), model=("vlm", 64))
    assert vlm.backend == "native" and "torchvision" in vlm.reason
    # vLLM installed in this very environment: no separate one needed
    here = choose_inference("auto", make_env("h100", vllm="0.33.0"), "cuda", venv=None, model=("vlm", 128))
    assert here.backend == "vllm" and "this environment" in here.reason


@pytest.mark.parametrize("profile, venv, match", [
    ("cpu", VllmEnvStatus("/opt/vv", "given", error="no vLLM environment at /opt/vv: run `ghostvis install vllm`"),
     "--backend vllm: no vLLM environment at /opt/vv: run `ghostvis install vllm`"),
    ("windows_gpu", None, "--backend vllm: vLLM runs only on Linux, not Windows"),
    ("v100", None, "compute capability 7.5"),
])  # fmt: skip
def test_explicit_vllm_that_cannot_run_says_why_and_the_fix(profile, venv, match):
    env = make_env(profile)
    with pytest.raises(BackendUnavailableError, match="ghostvis install vllm|Linux|7.5") as info:
        choose_inference("vllm", env, "cuda" if env.has_gpu else "cpu", venv=venv, model=("gpt", 64))
    assert match in str(info.value)


def test_explicit_vllm_refuses_a_model_it_cannot_serve():
    with pytest.raises(BackendUnavailableError, match="head_dim in .* is 16.*--backend native"):
        choose_inference("vllm", make_env("cpu"), "cpu", venv=venv_status(), model=("gpt", 16))
    with pytest.raises(ConfigError, match="--backend 'fast' is not one of native, vllm, auto"):
        choose_inference("fast", make_env("cpu"), "cpu")


def test_doctor_reports_the_separate_environment_truthfully():
    cpu = make_env("cpu")
    ok = next(c for c in run_checks(cpu, ["vllm"], venv_status()).checks if c.name == "vllm")
    assert ok.status == "ok" and ok.satisfied and ok.detail.startswith("vllm 0.32.0 in its own environment /opt/vv")
    broken = venv_status(usable=False, error="vLLM does not import in /opt/vv: ImportError: x: run `ghostvis install vllm`")
    report = run_checks(cpu, ["vllm"], broken)
    bad = next(c for c in report.checks if c.name == "vllm")
    assert bad.status == "fail" and "not usable" in bad.detail and "ImportError: x" in bad.fix
    assert report.exit_code == 1
    absent = next(c for c in run_checks(cpu, [], VllmEnvStatus("/opt/vv", "given")).checks if c.name == "vllm")
    assert absent.status == "ok" and "not installed" in absent.detail and "/opt/vv" in absent.detail


def test_install_plan_does_only_what_the_environment_lacks():
    cpu = make_env("cpu")
    fresh = plan_install("vllm", cpu, python="python", venv="/opt/vv", venv_status=VllmEnvStatus("/opt/vv", "given"))
    assert [s.description.split()[0] for s in fresh.steps] == ["create", "upgrade", "install", "install"]
    done = plan_install("vllm", cpu, python="python", venv="/opt/vv", venv_status=venv_status())
    assert done.already_usable and done.steps == []
    other = VllmEnvStatus("/opt/vv", "given", found=True, vllm_version="0.32.0", importable=True,
                          same_ghostvis=False, error="runs GhostVis 0.1.0 from /elsewhere")
    relink = plan_install("vllm", cpu, python="python", venv="/opt/vv", venv_status=other)
    assert [s.description for s in relink.steps] == ["install this GhostVis there (the vLLM worker runs its code)"]
    assert relink.steps[0].argv[:4] == ["/opt/vv/bin/python", "-m", "pip", "install"]


def test_the_environment_is_found_by_record_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("GHOSTVIS_VLLM_VENV", raising=False)
    assert vllm_venv()[1] == "default location"
    record_vllm_venv(tmp_path / "vv")
    where, source = vllm_venv()
    assert where == (tmp_path / "vv").resolve() and source.startswith("recorded in")
    monkeypatch.setenv("GHOSTVIS_VLLM_VENV", str(tmp_path / "other"))
    assert vllm_venv() == (tmp_path / "other", "GHOSTVIS_VLLM_VENV")
    status = probe_vllm_env(refresh=True)
    assert not status.found and not status.usable and "ghostvis install vllm --venv" in status.error


def test_backend_vllm_without_vllm_is_one_message(tmp_path, monkeypatch, capsys):
    from saved_runs import save_text_run

    monkeypatch.setenv("GHOSTVIS_VLLM_VENV", str(tmp_path / "none"))
    save_text_run("chat-x")
    for args in (["infer", "--model", "chat-x", "--prompt", "hi", "--backend", "vllm"],
                 ["bench", "--model", "chat-x", "--num-prompts", "2", "--backend", "vllm"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "no vLLM environment at" in err and "ghostvis install vllm" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["infer", "--model", "chat-x", "--prompt", "hi", "--backend", "auto",
                              "--max-tokens", "3"], capsys)  # fmt: skip
    assert code == 0, err
    assert out.startswith("model: ")
