"""A bounded load client: N concurrent streaming clients, each sending R requests, against one server.

Every request is a streamed /v1/completions (token-id prompts, so a random-weight model serves too) or
/v1/chat/completions; per request it records time to first token (first content chunk), total latency and the
completion tokens the final usage reports. The run is bounded by count (clients x requests) and by a
timeout per request; it sends traffic only to the URL given (loopback in tests and benchmarks).

Runs with httpx (or httpx2, the same API), so it needs no FastAPI or openai on the client side:
    python -m ghostvis_core.serving.load --url http://127.0.0.1:8000 --clients 256 --requests 1 \\
        --input-len 128 --output-len 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

try:
    import httpx
except ImportError:  # newer environments ship the same client as httpx2
    import httpx2 as httpx  # type: ignore[no-redef]


@dataclass
class LoadResult:
    """Per-request timings and counts of a load run."""

    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def num_ok(self) -> int:
        return len(self.latencies_s)

    def summary(self) -> dict:
        def pct(values, q):
            s = sorted(values)
            return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")

        return {
            "requests_ok": self.num_ok, "requests_failed": len(self.failures), "elapsed_s": self.elapsed_s,
            "output_tokens": self.completion_tokens, "output_tokens_per_s": self.completion_tokens / self.elapsed_s,
            "total_tokens_per_s": (self.completion_tokens + self.prompt_tokens) / self.elapsed_s,
            "latency_ms": {q: 1e3 * pct(self.latencies_s, int(q[1:])) for q in ("p50", "p90", "p99")},
            "ttft_ms": {q: 1e3 * pct(self.ttfts_s, int(q[1:])) for q in ("p50", "p90", "p99")},
            "failures": self.failures[:5],
        }  # fmt: skip


def _body(route: str, prompt, output_len: int, ignore_eos: bool) -> dict:
    common = {"max_tokens": output_len, "temperature": 0.0, "stream": True, "ignore_eos": ignore_eos,
              "stream_options": {"include_usage": True}}  # fmt: skip
    if route == "chat":
        return {"messages": [{"role": "user", "content": prompt}], **common}
    return {"prompt": prompt, **common}


async def _one(client, url: str, body: dict, result: LoadResult, timeout_s: float) -> None:
    t0 = time.perf_counter()
    first = None
    usage = None
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    try:
        async with client.stream("POST", url + path, json=body, timeout=timeout_s) as res:
            if res.status_code != 200:
                result.failures.append(f"HTTP {res.status_code}: {(await res.aread())[:200]!r}")
                return
            done = False
            async for line in res.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.failures.append(event["error"]["message"])
                    return
                usage = event.get("usage") or usage
                choice = event["choices"][0] if event["choices"] else {}
                has_content = choice.get("text") or choice.get("token_ids") or choice.get("delta", {}).get("content")
                if first is None and has_content:
                    first = time.perf_counter()
            if not done or usage is None:
                result.failures.append("the stream ended without [DONE] and usage")
                return
    except httpx.HTTPError as e:
        result.failures.append(f"{type(e).__name__}: {e}")
        return
    now = time.perf_counter()
    result.latencies_s.append(now - t0)
    result.ttfts_s.append((first or now) - t0)
    result.completion_tokens += usage["completion_tokens"]
    result.prompt_tokens += usage["prompt_tokens"]


async def run_load(url: str, clients: int, requests: int, prompts, output_len: int, *, route: str = "text",
                   ignore_eos: bool = True, api_key: str | None = None, timeout_s: float = 600.0) -> LoadResult:
    """`clients` concurrent clients, each sending `requests` streamed requests one after another; prompt i of
    a client is prompts[(client * requests + i) % len(prompts)]."""
    result = LoadResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout_s) as client:

        async def one_client(c: int) -> None:
            for i in range(requests):
                prompt = prompts[(c * requests + i) % len(prompts)]
                await _one(client, url, _body(route, prompt, output_len, ignore_eos), result, timeout_s)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        result.elapsed_s = time.perf_counter() - t0
    return result


def random_token_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` random token ids (below vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bounded streaming load against a ghostvis serve URL.")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    models = httpx.get(args.url + "/v1/models", headers={"Authorization": f"Bearer {args.api_key}"}
                       if args.api_key else {}).json()  # fmt: skip
    vocab = 4096 if not models["data"] else models["data"][0].get("vocab_size", 4096)
    prompts = random_token_prompts(args.clients * args.requests, args.input_len, vocab)
    result = asyncio.run(run_load(args.url, args.clients, args.requests, prompts, args.output_len,
                                  api_key=args.api_key))  # fmt: skip
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
