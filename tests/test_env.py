"""Environment facts: the real probe on this machine, profiles, and import-failure diagnosis."""

import json
import subprocess
import sys

import pytest
from helpers import FA2_UNDEFINED_SYMBOL, make_env, write_profile

from ghostvis_core import env as env_mod
from ghostvis_core.env import (
    EnvFacts,
    GPUInfo,
    PackageStatus,
    diagnose_import_error,
    probe_env,
    probe_package,
)
from ghostvis_core.errors import ConfigError


def test_probe_this_machine(monkeypatch):
    monkeypatch.delenv(env_mod.PROFILE_ENV_VAR, raising=False)
    facts = probe_env(refresh=True)
    assert facts is probe_env()  # cached per process
    assert facts.os_name in ("Linux", "Windows", "Darwin")
    assert facts.python == ".".join(map(str, sys.version_info[:3]))
    assert facts.cpu_count >= 1
    assert set(facts.packages) == {"triton", "flash_attn", "apex", "vllm", "liger_kernel", "torchao"}
    assert set(facts.torch_features) == {"flex_attention", "muon", "cudnn_sdpa"}
    if not facts.has_gpu:
        assert facts.gpu_count == 0 and facts.capability is None
    for status in facts.packages.values():
        assert status.installed or not status.importable
    json.dumps(facts.to_dict())  # JSON-ready
    env_mod.reset_env_cache()


def test_properties_from_hand_built_facts():
    facts = make_env("h100", num_gpus=8)
    assert facts.has_gpu and facts.gpu_count == 8
    assert facts.capability == (9, 0)
    assert facts.gpus[0].sm == 90
    cpu = make_env("cpu")
    assert not cpu.has_gpu and cpu.gpu_count == 0 and cpu.capability is None
    assert not cpu.package("not_probed").installed


def test_package_usable_needs_extensions():
    apex = PackageStatus(
        "apex",
        installed=True,
        version="0.1",
        importable=True,
        extensions={"fused_layer_norm_cuda": False, "amp_C": True},
    )
    assert not apex.usable
    apex.extensions["fused_layer_norm_cuda"] = True
    assert apex.usable


def test_profile_roundtrip_via_env_var(tmp_path, monkeypatch):
    facts = make_env("t4", flash_attn_error=FA2_UNDEFINED_SYMBOL)
    path = write_profile(facts, tmp_path / "t4.json")
    monkeypatch.setenv(env_mod.PROFILE_ENV_VAR, str(path))
    loaded = probe_env(refresh=True)
    assert loaded == facts
    assert loaded.gpus[0] == GPUInfo(0, "Tesla T4", (7, 5), 14.6)
    env_mod.reset_env_cache()


def test_bad_profiles_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'os_name': 1\n}")
    with pytest.raises(ConfigError, match=r"bad.json:2: not valid JSON"):
        env_mod.load_profile(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        env_mod.load_profile(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown env fact"):
        EnvFacts.from_dict({"os_name": "Linux", "torch_version": "2.11", "gpu_name": "x"})


def test_diagnoses():
    d = diagnose_import_error("flash_attn", FA2_UNDEFINED_SYMBOL, "2.11.0+cu130")
    assert d.startswith("built against another torch (undefined symbol)")
    assert "torch 2.11.0+cu130" in d and "`ghostvis install flash-attn`" in d
    d = diagnose_import_error("apex", "ModuleNotFoundError: No module named 'fused_layer_norm_cuda'", "2.11")
    assert "without its CUDA extensions" in d and "ghostvis install apex" in d
    d = diagnose_import_error(
        "flash_attn", "ImportError: libcudart.so.12: cannot open shared object file", "x"
    )
    assert "another CUDA version" in d


def test_probe_package_catches_import_failure(tmp_path, monkeypatch):
    """A package whose import raises (undefined symbol) is recorded, not raised."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"raise ImportError({FA2_UNDEFINED_SYMBOL.split(': ', 1)[1]!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(env_mod.OPTIONAL_PACKAGES, "flash_attn", ("ghostvis-test-no-such-dist",))
    status = probe_package("flash_attn")
    assert status.installed and not status.importable and not status.usable
    assert "undefined symbol: _ZN3c10" in status.error
    assert status.diagnosis.startswith("built against another torch")
    sys.modules.pop("flash_attn", None)


def test_probe_package_records_oserror(tmp_path, monkeypatch):
    pkg = tmp_path / "liger_kernel"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcublas.so.13: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(env_mod.OPTIONAL_PACKAGES, "liger_kernel", ("ghostvis-test-no-such-dist",))
    status = probe_package("liger_kernel")
    assert status.error.startswith("OSError: libcublas.so.13")
    assert "another CUDA version" in status.diagnosis
    sys.modules.pop("liger_kernel", None)


def test_driver_falls_back_to_nvidia_smi(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    monkeypatch.setattr(env_mod.shutil, "which", lambda name: "/usr/bin/" + name)

    def fake_run(cmd, **kw):
        assert cmd[0] == "nvidia-smi" and kw["timeout"] > 0
        return subprocess.CompletedProcess(cmd, 0, stdout="580.65.06\n580.65.06\n", stderr="")

    monkeypatch.setattr(env_mod.subprocess, "run", fake_run)
    assert env_mod._driver_version() == "580.65.06"

    def hanging_run(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(env_mod.subprocess, "run", hanging_run)
    assert env_mod._driver_version() is None


def test_profile_from_a_doctor_json_report(tmp_path):
    facts = make_env("a100", flash_attn="2.8.3")
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"facts": facts.to_dict(), "checks": [], "verdict": "x"}))
    assert env_mod.load_profile(path) == facts


@pytest.mark.parametrize(
    ("raw", "dotted"),
    [
        (91900, "9.19.0"),  # cuDNN >= 9: major*10000 + minor*100 + patch
        (90100, "9.1.0"),
        (90000, "9.0.0"),
        (91002, "9.10.2"),
        (8902, "8.9.2"),  # cuDNN < 9: major*1000 + minor*100 + patch
        (8700, "8.7.0"),
        (7605, "7.6.5"),
        ("91900", "9.19.0"),  # a profile written before versions were stored dotted
        ("9.19.0", "9.19.0"),
    ],
)
def test_format_cudnn_version(raw, dotted):
    assert env_mod.format_cudnn_version(raw) == dotted


def test_probe_stores_dotted_cudnn(monkeypatch):
    import torch

    monkeypatch.delenv(env_mod.PROFILE_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(env_mod, "_nccl_version", lambda _torch: None)
    monkeypatch.setattr(env_mod, "probe_package", lambda name: PackageStatus(name=name, installed=False))
    assert env_mod._probe().cudnn == "9.19.0"


def test_probe_gpus_from_profile_and_reset(tmp_path, monkeypatch):
    h100 = make_env("h100", num_gpus=8)
    h100.visible_devices = "0,1,2,3,4,5,6,7"
    monkeypatch.setenv(env_mod.PROFILE_ENV_VAR, str(write_profile(h100, tmp_path / "h100.json")))
    env_mod.reset_env_cache()
    gpus = env_mod.probe_gpus()
    assert gpus == env_mod.GpuFacts(True, 8, "0,1,2,3,4,5,6,7", h100.cpu_count)
    assert env_mod.probe_gpus() is gpus  # cached per process
    monkeypatch.setenv(env_mod.PROFILE_ENV_VAR, str(write_profile(make_env("cpu"), tmp_path / "cpu.json")))
    assert env_mod.probe_gpus() is gpus  # still cached until reset
    env_mod.reset_env_cache()
    assert env_mod.probe_gpus().gpu_count == 0 and not env_mod.probe_gpus().cuda_available
    env_mod.reset_env_cache()


def test_probe_gpus_skips_package_probes_and_agrees_with_probe_env(monkeypatch):
    monkeypatch.delenv(env_mod.PROFILE_ENV_VAR, raising=False)
    env_mod.reset_env_cache()

    def no_package_probe(name):
        raise AssertionError(f"probe_gpus probed package {name}")

    with monkeypatch.context() as m:
        m.setattr(env_mod, "probe_package", no_package_probe)
        light = env_mod.probe_gpus()
    full = probe_env(refresh=True)
    assert light == env_mod.GpuFacts(
        full.cuda_available, full.gpu_count, full.visible_devices, full.cpu_count
    )
    env_mod.reset_env_cache()
