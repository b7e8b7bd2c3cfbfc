"""Optional pieces never fail a run: no matplotlib means no loss.png and one log line; the launcher names
the signal that killed its child."""

from __future__ import annotations

import builtins
import json
import logging
import signal

from ghostvis_core.train.launch import describe_child_exit, exit_code
from ghostvis_core.train.plot import plot_loss


def test_plot_is_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 4)))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level(logging.INFO, logger="ghostvis"):
        assert plot_loss(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    lines = [r.message for r in caplog.records if "loss plot skipped" in r.message]
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0] and str(metrics) in lines[0]


def test_plot_is_written_with_matplotlib(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 4)))
    out = plot_loss(metrics, tmp_path / "loss.png")
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_child_killed_by_the_os_is_named():
    code = exit_code(-signal.SIGKILL)
    assert code == 137
    message = describe_child_exit(code)
    assert message.startswith("was killed by SIGKILL") and "out-of-memory killer" in message and "dmesg" in message
    assert describe_child_exit(exit_code(-signal.SIGSEGV)) == "was killed by SIGSEGV"
    assert describe_child_exit(3) == "exited with code 3; its output above says why"
