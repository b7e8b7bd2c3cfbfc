"""The GPU comparison script and the loss-parity script, run on this CPU at tiny sizes (so they do not fail on
the GPU machine where time is scarce)."""

from __future__ import annotations

import json

import pytest

from ghostvis_core.bench import loss_parity, nanochat_compare


@pytest.mark.slow
def test_compare_runs_our_rows_and_skips_what_is_missing(tmp_path, capsys):
    out = tmp_path / "compare.json"
    code = nanochat_compare.main(["--tiny", "--nanochat-root", str(tmp_path / "none"), "--out", str(out),
                                  "--fit", "tiny:1"])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"ghostvis_bf16", "ghostvis_adamw"}
    assert "no nanochat source under" in result["skipped"]["nanochat_bf16"]
    assert "fp8 needs a CUDA GPU" in result["skipped"]["ghostvis_fp8"]
    for row in result["rows"].values():
        assert row["tok_per_s"] > 0 and row["flops_per_token"] > 0 and row["final_loss"] > 0
    assert "Muon (Polar Express" in result["rows"]["ghostvis_bf16"]["what"]
    assert set(result["ratios"]) == {"ghostvis_bf16/ghostvis_adamw"}
    assert [(f["activation_checkpointing"], f["fits"]) for f in result["fit"]] == [
        ("none", True), ("selective", True), ("full", True)]
    text = capsys.readouterr().out
    assert "ratio ghostvis_bf16/ghostvis_adamw" in text and "skipped nanochat_fp8" in text


def _metrics(run_dir, losses):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                   for i, v in enumerate(losses)))
    return run_dir


def test_loss_parity_reports_and_fails_out_of_tolerance(tmp_path, capsys):
    a = _metrics(tmp_path / "bf16", [5.0, 4.0, 3.0, 3.0])
    b = _metrics(tmp_path / "fp8", [5.0, 4.1, 3.03, 3.03])
    png = tmp_path / "parity.png"
    assert loss_parity.main([str(a), str(b), "--out", str(png), "--last", "2", "--max-rel-diff", "0.02"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1.00% from bf16" in capsys.readouterr().out
    assert loss_parity.main([str(a), str(b), "--out", str(png), "--last", "2", "--max-rel-diff", "0.005"]) == 1


def test_decode_step_probe_times_each_variant_on_cpu(capsys):
    from ghostvis_core.bench import decode_step

    args = ["--preset", "tiny", "--batch", "1", "3", "--cached", "5", "--slots", "16", "--attn", "auto",
            "--unfused", "--device", "cpu", "--json"]  # fmt: skip
    assert decode_step.main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["fused"], r["batch"]) for r in rows] == [(True, 1), (True, 3), (False, 1), (False, 3)]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["decode"] == "SDPA/math" for r in rows)
    assert decode_step.main(["--preset", "tiny", "--attn", "flash_attn", "--device", "cpu"]) == 2
    assert "flash_attn" in capsys.readouterr().err
    assert decode_step.main(["--preset", "tiny", "--layers", "triton", "--device", "cpu"]) == 2
    assert "decode_layers=triton was requested" in capsys.readouterr().err


def test_decode_attention_sweep_runs_the_kernel_on_cpu(capsys):
    """The sweep's CPU smoke run: the Triton kernel through the interpreter, one row per shape, JSON lines."""
    pytest.importorskip("triton")
    from helpers import triton_interpreted

    with triton_interpreted("ghostvis_core.kernels.decode_attention_triton"):
        from ghostvis_core.bench import decode_attention

        assert decode_attention.main(["--preset", "tiny", "--rows", "2:5", "1:0", "--slots", "16", "--fp8",
                                      "--json"]) == 0  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    head, shapes = lines[0], lines[1:]
    assert head["device"] == "cpu" and head["copy_gb_s"] is None
    assert [(s["batch"], s["cached"]) for s in shapes] == [(2, 5), (1, 0)]
    for s in shapes:
        assert sorted(r["kernel"] for r in s["rows"]) == ["triton", "triton_fp8"]
        assert all(r["ms"] > 0 and r["gb_s"] >= 0 for r in s["rows"])
