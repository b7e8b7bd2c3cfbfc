"""`ghostvis bench kernels` rendering from hand-made results (no GPU): compact at 80 columns, --json JSON-only."""

from __future__ import annotations

import json

import pytest
import typer
from helpers import cli_app
from rich.console import Console
from typer.testing import CliRunner

from ghostvis_cli import bench as bench_cli
from ghostvis_core.bench import kernels_bench

BASE = {"batch": 4, "heads": 16, "seq_len": 4096, "head_dim": 128, "dtype": "bfloat16"}
FA2_REASON = "flash-attn does not import (No module named 'flash_attn'); `ghostvis install flash-attn`"
# The keys run_attention_bench() returns (ghostvis_core/bench/attention_bench.py).
ATTENTION_ROWS = [
    {**BASE, "backend": "flash_attn", "label": "FlashAttention-2", "case": "dense", "status": "absent",
     "reason": FA2_REASON},
    {**BASE, "backend": "flash_attn", "label": "FlashAttention-2", "case": "packed", "status": "absent",
     "reason": FA2_REASON},
    {**BASE, "backend": "sdpa_cudnn", "label": "SDPA/cuDNN", "case": "dense", "status": "ok", "fwd_ms": 0.612,
     "fwd_bwd_ms": 2.034, "fwd_tflops": 449.2, "fwd_bwd_tflops": 473.1},
    {**BASE, "backend": "sdpa_cudnn", "label": "SDPA/cuDNN", "case": "packed", "status": "absent",
     "reason": "SDPA/cuDNN takes no document mask"},
    {**BASE, "backend": "sdpa_efficient", "label": "SDPA/efficient", "case": "dense", "status": "error",
     "reason": "No available kernel. Aborting execution."},
    {**BASE, "backend": "flex", "label": "FlexAttention (compiled)", "case": "dense", "status": "ok",
     "fwd_ms": 1.101, "fwd_bwd_ms": 4.51, "fwd_tflops": 249.7, "fwd_bwd_tflops": 213.4},
    {**BASE, "backend": "flex", "label": "FlexAttention (compiled)", "case": "packed", "status": "ok",
     "docs_per_row": 8, "fwd_ms": 0.201, "fwd_bwd_ms": 0.77, "dense_fwd_ms": 1.101, "dense_fwd_bwd_ms": 4.51,
     "speedup_vs_dense": 5.857},
]  # fmt: skip


def _kernel_row(kernel: str, impl: str, **kw) -> dict:
    row = {"kernel": kernel, "impl": impl, "status": "ok", "reason": None, "fwd_ms": 0.1, "fwdbwd_ms": 0.3,
           "fwd_gb_s": 2900.0, "fwdbwd_gb_s": 2700.0, "fwd_pct_copy": 90.1, "fwdbwd_pct_copy": 84.0,
           "rel_err": 3e-3}  # fmt: skip
    row.update(kw)
    return row


RESULT = {
    "device": "NVIDIA H100 80GB HBM3",
    "torch": "2.13.0+cu130",
    "triton": "3.9.0",
    "config": {},
    "copy": {"bytes": 2 * 2**30, "ms": 0.7, "gb_s": 3100.0},
    "rms_norm": [_kernel_row("rms_norm", "triton"), _kernel_row("rms_norm", "torch")],
    "swiglu": [
        _kernel_row("swiglu", "triton"),
        _kernel_row("swiglu", "liger", status="absent", reason="liger_kernel is not installed"),
    ],
    "attention": ATTENTION_ROWS,
}


def _render(table, width: int) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    console.file.close()
    return text


def _numbers(lines: list[str], backend: str, case: str) -> list[str]:
    """The four number cells of the row for (backend, case)."""
    line = next(line for line in lines if line.startswith(backend) and f" {case} " in line)
    cells = line.split()
    return cells[cells.index(case) + 1 : cells.index(case) + 5]


@pytest.mark.parametrize("width", [80, 120])
def test_attention_table_is_readable(width):
    text = _render(bench_cli.attention_table(ATTENTION_ROWS), width)
    print(text)
    assert "…" not in text  # no cell is cut down to an ellipsis
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    assert "B=4 H=16 T=4096 D=128 bfloat16" in text and "8 docs/row" in text
    lines = text.splitlines()
    assert _numbers(lines, "SDPA/cuDNN", "dense") == ["0.612", "2.034", "449", "473"]
    assert _numbers(lines, "FlexAttention", "packed") == ["0.201", "0.770", "-", "-"]  # no TFLOP/s when packed
    words = " ".join(text.split())
    assert "5.86x dense" in words
    assert "absent: SDPA/cuDNN takes no document mask" in words
    assert "error: No available kernel." in words
    assert words.count("ghostvis install flash-attn") == 1  # the second absent flash-attn row says "as above"
    assert "absent: as above" in words
    # 7 columns: backend, case, fwd ms, fwd+bwd ms, fwd TFLOP/s, fwd+bwd TFLOP/s, note
    assert len(bench_cli.attention_table(ATTENTION_ROWS).columns) == 7


def _app() -> typer.Typer:
    return cli_app(bench_cli.register)


def test_bench_kernels_text_at_80_columns_and_json_only(monkeypatch):
    calls = []

    def fake_run(cfg):
        calls.append(cfg)
        return RESULT

    monkeypatch.setattr(kernels_bench, "run_kernel_bench", fake_run)
    monkeypatch.setattr(bench_cli, "console", Console(width=80))
    result = CliRunner().invoke(_app(), ["bench", "kernels"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert "NVIDIA H100 80GB HBM3" in result.output and "FlexAttention" in result.output
    assert "SDPA/cuDNN" in result.output

    result = CliRunner().invoke(_app(), ["bench", "kernels", "--json", "--no-compile"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == RESULT  # stdout is the JSON document and nothing else
    assert calls[-1].compile is False
