"""`ghostvis serve` as a command: the missing-extra message, bad flags, the non-loopback warning, the real
entry point with an API key and its access log, and the serve-under-load benchmark on a tiny preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import run_cli

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ghostvis[serve]'")
from test_serve import save_run  # noqa: E402

from ghostvis_core.serving.load import httpx  # noqa: E402


def test_missing_extra_is_one_message_with_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    code, _, err = run_cli(["serve"], capsys)
    assert code == 2 and "needs uvicorn" in err and "pip install 'ghostvis[serve]'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, match", [
    (["--backend", "vllm"], "--backend vllm: this command serves with the native engine only"),
    (["--model", "no_such_run"], "no_such_run"),
    (["--model", "x", "--preset", "tiny"], "not both"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1"),
    (["--image-root", "/no/such/folder"], "--image-root /no/such/folder: not a folder"),
])  # fmt: skip
def test_bad_flags_are_one_message(capsys, args, match):
    code, _, err = run_cli(["serve", *args], capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_non_loopback_without_a_key_warns(capsys, monkeypatch):
    from ghostvis_cli.serve import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
    monkeypatch.delenv("GHOSTVIS_API_KEY", raising=False)
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--model", "no_such_run"], capsys)  # stops at the model
    assert "warning:" in err and "no API key" in err and "--api-key" in err and code == 2
    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--api-key", "k", "--model", "no_such_run"], capsys)
    assert "warning:" not in err


def test_the_command_serves_with_a_key_and_logs_each_request(tmp_path):
    run = save_run(tmp_path, "chat", vision=False)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GHOSTVIS_HOME": str(tmp_path / "home"), "GHOSTVIS_API_KEY": "sk-local"}
    proc = subprocess.Popen([sys.executable, "-m", "ghostvis_cli", "serve", "--model", str(run), "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer sk-local"}
        r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    print(err)
    assert f"serving chat at http://127.0.0.1:{port}/v1" in err
    line = next(x for x in err.splitlines() if "/v1/chat/completions 200" in x)
    assert line.startswith("chatcmpl-") and " in=" in line and " out=" in line and "ttft=" in line and "total=" in line


def test_serve_bench_on_a_tiny_preset():
    cmd = [sys.executable, "-m", "ghostvis_core.serving.bench", "--preset", "tiny", "--clients", "8",
           "--input-len", "8", "--output-len", "8", "--batch-size", "4", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout)
    serve, bench = r["serve"], r["bench"]
    print(f"serve {serve['output_tokens_per_s']:.0f} tok/s p99 {serve['latency_ms']['p99']:.0f} ms; "
          f"bench {bench['output_tokens_per_s']:.0f} tok/s")
    assert serve["requests_ok"] == 8 and serve["requests_failed"] == 0 and serve["output_tokens"] == 64
    assert bench["output_tokens"] == 64 and serve["server"]["requests_finished"] >= 8 + 4  # warm-up too
