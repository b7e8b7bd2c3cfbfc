"""Shared test helpers: hand-built machine profiles (EnvFacts) for backend, doctor and install tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ghostvis_core.env import EnvFacts, GPUInfo, PackageStatus

FA2_UNDEFINED_SYMBOL = (
    "ImportError: /usr/lib/python3.12/site-packages/flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c104cuda9SetDeviceEi"
)

# name -> (GPU name, capability, memory GiB); None = no GPU.
GPU_PROFILES: dict[str, tuple[str, tuple[int, int], float] | None] = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 79.2),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 79.2),
    "v100": ("Tesla V100-SXM2-32GB", (7, 0), 31.7),
    "t4": ("Tesla T4", (7, 5), 14.6),
    "rtx4090": ("NVIDIA GeForce RTX 4090", (8, 9), 23.5),
    "b200": ("NVIDIA B200", (10, 0), 178.4),
    "windows_gpu": ("NVIDIA GeForce RTX 3090", (8, 6), 24.0),
    "cpu": None,
}


def _pkg(name: str, version: str | None = None, **kw) -> PackageStatus:
    """An installed-and-importable package, or a not-installed one when version is None."""
    if version is None:
        return PackageStatus(name=name, installed=False)
    return PackageStatus(
        name=name, installed=True, version=version, importable=kw.pop("importable", True), **kw
    )


def make_env(
    profile: str,
    *,
    num_gpus: int = 1,
    flash_attn: str | None = None,
    flash_attn_error: str | None = None,
    triton: str | None = "auto",
    apex: str | None = None,
    apex_ext: bool = True,
    vllm: str | None = None,
    liger: str | None = None,
    torch_version: str = "2.11.0+cu130",
    muon: bool = True,
    nvcc: str | None = "13.0",
    ninja: str | None = "1.11.1",
    ram_gib: float = 256.0,
    cpu_count: int = 32,
) -> EnvFacts:
    """Build EnvFacts for a named machine profile (see GPU_PROFILES) with chosen optional packages."""
    gpu = GPU_PROFILES[profile]
    windows = profile == "windows_gpu"
    has_gpu = gpu is not None
    if not has_gpu:
        torch_version = "2.13.0+cpu"
    if triton == "auto":
        # Triton ships with torch on Linux; on Windows it is a separate, usually absent, install.
        triton = None if windows else ("3.6.0" if has_gpu else "3.9.0")
    packages = {
        "triton": _pkg("triton", triton),
        "flash_attn": _pkg("flash_attn", flash_attn),
        "apex": _pkg(
            "apex", apex, extensions={"fused_layer_norm_cuda": apex_ext, "amp_C": apex_ext} if apex else {}
        ),
        "vllm": _pkg("vllm", vllm),
        "liger_kernel": _pkg("liger_kernel", liger),
    }
    if flash_attn_error is not None:
        from ghostvis_core.env import diagnose_import_error

        packages["flash_attn"] = PackageStatus(
            name="flash_attn",
            installed=True,
            version=flash_attn or "2.8.3",
            importable=False,
            error=flash_attn_error,
            diagnosis=diagnose_import_error("flash_attn", flash_attn_error, torch_version),
        )
    gpus = [GPUInfo(i, gpu[0], gpu[1], gpu[2]) for i in range(num_gpus)] if has_gpu else []
    return EnvFacts(
        os_name="Windows" if windows else "Linux",
        os_release="10" if windows else "6.8.0",
        machine="AMD64" if windows else "x86_64",
        python="3.12.3",
        torch_version=torch_version,
        torch_cuda=("13.0" if has_gpu else None),
        cuda_available=has_gpu,
        driver="580.65.06" if has_gpu else None,
        cudnn="91900" if has_gpu else None,
        nccl=("2.27.7" if has_gpu and not windows else None),
        gpus=gpus,
        visible_devices=None,
        nvcc=nvcc if has_gpu else None,
        ninja=ninja,
        ram_gib=ram_gib,
        cpu_count=cpu_count,
        runs_dir="/tmp/ghostvis/runs",
        disk_free_gib=500.0,
        packages=packages,
        torch_features={"flex_attention": True, "muon": muon, "cudnn_sdpa": has_gpu},
    )


def write_profile(env: EnvFacts, path: Path) -> Path:
    """Write EnvFacts as the JSON that GHOSTVIS_ENV_PROFILE reads."""
    path.write_text(json.dumps(env.to_dict()))
    return path


@pytest.fixture
def use_profile(tmp_path, monkeypatch):
    """Make probe_env() (and so every CLI command) see a hand-built machine: use_profile(make_env(...))."""
    from ghostvis_core import env as env_mod

    def _use(env: EnvFacts) -> Path:
        path = write_profile(env, tmp_path / "env_profile.json")
        monkeypatch.setenv(env_mod.PROFILE_ENV_VAR, str(path))
        env_mod.probe_env(refresh=True)
        return path

    yield _use
    env_mod.reset_env_cache()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Runs and caches of every test go to a temporary GHOSTVIS_HOME."""
    monkeypatch.setenv("GHOSTVIS_HOME", str(tmp_path / "ghostvis_home"))
