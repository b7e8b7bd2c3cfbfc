"""`ghostvis serve` under a bounded local load, beside `ghostvis bench --num-prompts` on the same model.

    python -m ghostvis_core.serving.bench --preset d20 --clients 256 --input-len 128 --output-len 256

starts `ghostvis serve` (random weights of the preset, or --model RUN) in its own process on a loopback port,
warms it up (one request per row captures the decode graphs), sends `clients` concurrent streaming requests of
random token ids (load.py: input_len in, exactly output_len out), stops the server, then runs `ghostvis bench
--num-prompts clients` with the same model, lengths and batch size in a fresh process, and prints both: the
server's output tok/s, TTFT and latency percentiles next to the offline engine's. Only fastapi, uvicorn and
httpx are needed beyond GhostVis itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from ghostvis_core.serving.load import httpx, random_token_prompts, run_load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ghostvis_cli", *args]


def _model_args(a) -> list[str]:
    return ["--preset", a.preset] if a.model is None else ["--model", a.model]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ghostvis serve exited with {proc.returncode} before it was ready (see its log)")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise SystemExit(f"ghostvis serve was not ready after {timeout_s:.0f} s")


def serve_under_load(a) -> dict:
    """Start the server, warm it up, run the load; returns the load summary and the server's /metrics."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = _cli("serve", *_model_args(a), "--port", str(port), "--max-batch-size", str(a.batch_size),
               "--max-model-len", str(a.input_len + a.output_len), "--max-tokens", str(a.output_len),
               "--sync-every", str(a.sync_every), "--max-concurrent", str(max(512, 2 * a.clients)))  # fmt: skip
    log = tempfile.NamedTemporaryFile("w", prefix="ghostvis-serve-", suffix=".log", delete=False)
    print(f"server log (one line per request): {log.name}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=log)
    try:
        _wait_healthy(url, proc, a.start_timeout)
        vocab = httpx.get(url + "/v1/models").json()["data"][0]["vocab_size"]
        prompts = random_token_prompts(a.clients, a.input_len, vocab, seed=a.seed)
        warm = asyncio.run(run_load(url, a.batch_size, 1, prompts, 4))  # every row busy once: graphs captured
        if warm.failures:
            raise SystemExit(f"warm-up failed: {warm.failures[:3]}")
        result = asyncio.run(run_load(url, a.clients, a.requests, prompts, a.output_len))
        metrics = httpx.get(url + "/metrics").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    return {"command": " ".join(cmd[2:]), **result.summary(), "server": metrics}


def offline_bench(a) -> dict:
    cmd = _cli("bench", *_model_args(a), "--num-prompts", str(a.clients * a.requests), "--input-len",
               str(a.input_len), "--output-len", str(a.output_len), "--batch-size", str(a.batch_size), "--json")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ghostvis bench failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"command": " ".join(cmd[2:]), **json.loads(done.stdout)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="d20", help="random weights of this preset (default d20)")
    p.add_argument("--model", default=None, help="a run instead of random weights (its tokens, its stops)")
    p.add_argument("--clients", type=int, default=256, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="server rows and the offline bench's batch size")
    p.add_argument("--sync-every", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    served = serve_under_load(a)
    offline = offline_bench(a)
    if a.json:
        print(json.dumps({"serve": served, "bench": offline}, indent=2))
        return
    print("=== ghostvis serve under load vs ghostvis bench ===")
    print(f"serve: {served['command']}")
    print(f"load:  {a.clients} concurrent streaming clients x {a.requests}, {a.input_len} in / {a.output_len} out")
    print(f"bench: {offline['command']}")
    rows = [("output tok/s", served["output_tokens_per_s"], offline["output_tokens_per_s"]),
            ("latency p50 ms", served["latency_ms"]["p50"], offline["latency_ms"]["p50"]),
            ("latency p99 ms", served["latency_ms"]["p99"], offline["latency_ms"]["p99"]),
            ("TTFT p50 ms", served["ttft_ms"]["p50"], offline["ttft_ms"]["p50"]),
            ("TTFT p99 ms", served["ttft_ms"]["p99"], offline["ttft_ms"]["p99"])]  # fmt: skip
    print(f"{'':>16} {'serve':>12} {'bench':>12} {'serve/bench':>12}")
    for name, s, b in rows:
        print(f"{name:>16} {s:>12,.1f} {b:>12,.1f} {s / b:>12.2f}")
    print(f"requests ok {served['requests_ok']}, failed {served['requests_failed']}; server mean batch occupancy "
          f"{served['server']['mean_batch_occupancy']:.2f}")
    from ghostvis_core.scheduler import Scheduler

    for who, t in (("serve", served["server"].get("scheduler")), ("bench", offline.get("scheduler"))):
        if t:  # the loop thread's time per decode chunk (Scheduler.timing)
            print(f"{who} {Scheduler.format_timing(t)}")


if __name__ == "__main__":
    main()
