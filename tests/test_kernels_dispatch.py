"""Backend dispatch of `rms_norm` / `swiglu` and the `ghostvis bench` commands, on CPU (no Triton launches)."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
import typer
from helpers import cli_app
from helpers import hf_llama_rms_norm as _llama_rms_norm
from typer.testing import CliRunner

from ghostvis_cli import bench as bench_cli
from ghostvis_core.errors import BackendUnavailableError, ConfigError, GhostVisError
from ghostvis_core.kernels import rms_norm, swiglu


@pytest.mark.parametrize("backend", ["torch"])
def test_rms_norm_torch_backend_matches_llama_formula(backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 123, 123, generator=gen)
    w = torch.randn(123, generator=gen)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, backend=backend), _llama_rms_norm(x, w, 1e-5))
    assert rms_norm(x, None, 1e-5, backend=backend).shape == x.shape


def test_rms_norm_torch_backend_mixed_dtypes_promote_like_hf():
    x = torch.randn(4, 64).bfloat16()
    w = torch.randn(64)
    y = rms_norm(x, w, 1e-5, backend="torch")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _llama_rms_norm(x, w, 1e-5), atol=0, rtol=0)


def test_swiglu_torch_backend():
    gate, up = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(swiglu(gate, up, backend="torch"), F.silu(gate) * up)


def test_kernels_take_only_concrete_names():
    # "auto" is the plan's word; a kernel entry point never resolves it
    with pytest.raises(ConfigError, match="not one of triton, apex, torch"):
        rms_norm(torch.randn(2, 8), None, backend="auto")
    with pytest.raises(ConfigError, match="not one of triton, torch"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8), backend="auto")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="not one of"):
        rms_norm(torch.randn(2, 8), None, backend="cuda")
    with pytest.raises(ConfigError, match="not one of"):
        swiglu(torch.randn(2, 8), torch.randn(2, 8), backend="fast")


def test_explicit_requests_that_cannot_run_on_cpu_raise(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        rms_norm(x, None, backend="triton")
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        swiglu(x, x, backend="triton")
    with pytest.raises(BackendUnavailableError, match="apex"):
        rms_norm(x, None, backend="apex")
    with pytest.raises(BackendUnavailableError, match="no SwiGLU"):
        swiglu(x, x, backend="apex")


def _bench_app() -> typer.Typer:
    return cli_app(bench_cli.register)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_kernels_without_cuda_is_a_user_error():
    result = CliRunner().invoke(_bench_app(), ["bench", "kernels"])
    assert result.exit_code != 0
    assert isinstance(result.exception, GhostVisError)
    assert "needs a CUDA GPU" in str(result.exception)


def test_bench_kernels_rejects_bad_flags():
    result = CliRunner().invoke(_bench_app(), ["bench", "kernels", "--dtype", "int8"])
    assert isinstance(result.exception, ConfigError)
    assert "--dtype" in str(result.exception)


def test_bench_train_passes_its_flags(monkeypatch):
    calls = []

    def run_train_bench(**kwargs):
        calls.append(kwargs)
        return {"tok_per_s": 1234.5, "speedup": 0.5}

    fake = types.ModuleType("ghostvis_core.bench.train_bench")
    fake.run_train_bench = run_train_bench
    fake.format_train_bench = lambda result: f"speedup: {result['speedup']:.2f}x"
    monkeypatch.setitem(sys.modules, "ghostvis_core.bench.train_bench", fake)
    args = ["bench", "train", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--steps", "3"]
    result = CliRunner().invoke(_bench_app(), args + ["--json", "--no-compile"])
    assert result.exit_code == 0, result.output
    assert '"tok_per_s": 1234.5' in result.output
    assert calls == [dict(preset="tiny", seq_len=64, batch_size=2, steps=3, compile=False, optimizer="auto",
                          norm_backend="auto", packed=0, fp8="none", activation_checkpointing="none")]
    result = CliRunner().invoke(_bench_app(), args + ["--optimizer", "muon", "--norm-backend", "torch", "--packed",
                                                      "8", "--fp8", "tensorwise", "--recompute",
                                                      "selective"])
    assert result.exit_code == 0, result.output
    assert "speedup: 0.50x" in result.output
    assert calls[-1]["compile"] is True and calls[-1]["optimizer"] == "muon" and calls[-1]["norm_backend"] == "torch"
    assert (calls[-1]["packed"], calls[-1]["fp8"], calls[-1]["activation_checkpointing"]) == (8, "tensorwise",
                                                                                               "selective")
