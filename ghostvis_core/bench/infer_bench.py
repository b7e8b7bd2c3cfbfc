"""`ghostvis bench --num-prompts`: offline inference throughput of the native engine (and HF's, compared).

Prompts are random tokens of exactly input_len and every request generates exactly output_len tokens (EOS
ignored), so the numbers measure the engine, not the model's taste for stopping. All requests arrive at once
(vLLM's offline throughput benchmark); TTFT and latency per request count from when it enters a batch row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ghostvis_core.bench.timing import sync
from ghostvis_core.errors import ConfigError, GhostVisError
from ghostvis_core.log import get_logger


def random_model(preset: str, device: str | None, dtype: str, compile: bool | None = None, attn: str = "auto"):
    """A preset's GPT with random weights (every matrix N(0, 0.02): realistic activations, no zero blocks);
    compile: whether the decode step is compiled (None: the plan's default, on for CUDA); attn: the
    attention request (auto: the plan's choice per case)."""
    import dataclasses

    from ghostvis_core.engine import LoadedModel, cast_parameters_, inference_plan
    from ghostvis_core.gpt import GPT
    from ghostvis_core.model_configs import get_preset

    config = dataclasses.replace(get_preset(preset), attn_backend=attn)
    plan = inference_plan(config, device, dtype, compile)
    torch.manual_seed(0)
    with torch.device(plan.device_type):
        model = GPT(config, plan)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02)
    return LoadedModel(cast_parameters_(model, plan.dtype), None, None, f"random {preset}", "text", plan)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every matrix once; an untied embedding table only one row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_embeddings:
        emb = model.model.embed_tokens.weight
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(completions, elapsed_s: float, input_len: int) -> dict:
    """The result block's numbers from per-request timing."""
    n = len(completions)
    out_tokens = sum(len(c.token_ids) for c in completions)
    ttft = [1e3 * c.ttft_s for c in completions]
    lat = [1e3 * c.latency_s for c in completions]
    return {
        "num_prompts": n,
        "elapsed_s": elapsed_s,
        "requests_per_s": n / elapsed_s,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed_s,
        "total_tokens_per_s": (out_tokens + n * input_len) / elapsed_s,
        "latency_ms_per_prompt": 1e3 * elapsed_s / n,
        "ttft_ms": {"mean": sum(ttft) / n, "p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "latency_ms": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99)},
    }


def _timed(engine, prompts, max_tokens: int, batch_size: int, cache_len: int):
    from ghostvis_core.sampling import SamplingParams

    sampling = SamplingParams(ignore_eos=True)  # greedy; EOS ignored so every request makes max_tokens
    # Warm-up at the timed batch size and cache length: builds the cache and captures the CUDA graph.
    engine.generate_many(prompts[:batch_size], sampling, 2, batch_size, cache_len=cache_len)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.generate_many(prompts, sampling, max_tokens, batch_size, cache_len=cache_len)
    return done, time.perf_counter() - t0  # generate_many ends on a host read: the GPU is done


def batch1_bandwidth(loaded, engine, prompts, output_len: int, cache_len: int) -> dict:
    """Batch-1 decode tok/s (after the first token) and the weight bytes it reads, vs a device copy."""
    from ghostvis_core.bench.timing import copy_bandwidth

    done, _ = _timed(engine, prompts[:1], output_len, 1, cache_len)
    c = done[0]
    tok_s = (len(c.token_ids) - 1) / (c.latency_s - c.ttft_s)
    nbytes = weight_bytes_per_token(engine.model)
    read_gb_s = nbytes * tok_s / 1e9
    copy = copy_bandwidth()
    return {"decode_tokens_per_s": tok_s, "weight_bytes_per_token": nbytes, "weights_gb_s": read_gb_s,
            "copy_gb_s": copy.gb_s, "pct_of_copy": 100 * read_gb_s / copy.gb_s}  # fmt: skip


def hf_static_generate(model, prompts: list[list[int]], output_len: int, batch_size: int) -> dict:
    """transformers' LlamaForCausalLM on the same weights: generate with the static cache, greedy, no EOS stop.

    Prompts go in batches of batch_size (all of one length, so no padding); timed after one warm-up batch of
    every batch shape the run has (the last batch may be smaller, and generate compiles and allocates a static
    cache per shape: left in the timed loop, that one-off cost was counted as HF's throughput).
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise GhostVisError(f"--compare hf needs transformers ({exc}); `pip install transformers`") from None
    from ghostvis_core.export import hf_llama_config_dict

    config = LlamaConfig(**hf_llama_config_dict(model.config, None))
    dtype = model.lm_head.weight.dtype
    device = model.lm_head.weight.device
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise GhostVisError(f"--compare hf: the state dict does not map onto LlamaForCausalLM "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              cache_implementation="static", pad_token_id=0)  # fmt: skip

    def run(batch):
        return hf.generate(batch, attention_mask=torch.ones_like(batch), **kw)

    with torch.no_grad():
        for rows in sorted({min(batch_size, len(prompts) - s) for s in range(0, len(prompts), batch_size)}):
            run(ids[:rows])  # warm-up of each shape
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(prompts), batch_size):
            run(ids[s : s + batch_size])
        sync(device)
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tokens_per_s": len(prompts) * output_len / elapsed}


def run_infer_bench(
    num_prompts: int, input_len: int, output_len: int, batch_size: int = 64, *, model: str | None = None,
    preset: str | None = None, backend: str = "native", compare: str | None = None, dtype: str = "auto",
    device: str | None = None, seed: int = 0, hf_batch_sizes: Sequence[int] = (), kv_cache_dtype: str = "auto",
) -> dict:  # fmt: skip
    """Run the benchmark; returns the JSON-able result (see `format_infer_bench`).

    kv_cache_dtype: the native engine's cache storage, auto or fp8 (kv_cache.py); HF's run keeps its own cache.

    hf_batch_sizes: the batch sizes HF's generate is timed at with --compare hf (default: batch_size); the
    ratio is against the fastest of them, HF's best batched throughput on the same prompts."""
    from ghostvis_core.batch_engine import Engine
    from ghostvis_core.engine import load_for_inference

    for name, v in (("--num-prompts", num_prompts), ("--input-len", input_len), ("--output-len", output_len),
                    ("--batch-size", batch_size)):  # fmt: skip
        if v < 1:
            raise ConfigError(f"{name} must be >= 1 (got {v})")
    if compare not in (None, "hf"):
        raise ConfigError(f"--compare {compare!r}: the only comparison is hf (transformers, static cache)")
    if hf_batch_sizes and compare != "hf":
        raise ConfigError("--hf-batch-sizes sets the batch sizes of --compare hf: pass --compare hf too")
    if any(b < 1 for b in hf_batch_sizes):
        raise ConfigError(f"--hf-batch-sizes must all be >= 1 (got {','.join(map(str, hf_batch_sizes))})")
    if model and preset:
        raise ConfigError("pass --model RUN or --preset NAME, not both")
    from ghostvis_core.vllm_backend import inference_choice

    if kv_cache_dtype != "auto" and backend == "vllm":
        raise ConfigError("--kv-cache-dtype sets the native engine's cache; drop it with --backend vllm")
    if backend == "vllm" and not model:
        raise ConfigError("--backend vllm benchmarks an exported model: pass --model RUN (random --preset "
                          "weights run on the native engine)")
    if model or backend != "auto":
        choice, path = inference_choice(backend, model)  # validates the name; auto: vLLM or native, and why
        if choice.backend == "vllm":
            return run_vllm_bench(path, num_prompts, input_len, output_len, dtype=dtype, seed=seed)
    else:
        get_logger().info("--backend auto: the native engine (random --preset weights are not exported for vLLM)")
    backend = "native"
    loaded = load_for_inference(model, device, dtype) if model else random_model(preset or "d20", device, dtype)
    from ghostvis_core.models import language_model

    m = language_model(loaded.model)  # what the engine decodes through
    if m is not loaded.model:
        get_logger().info("a vision run: random text prompts decode through its language model (no images; "
                          "the vision tower is not timed)")
    cache_len = input_len + output_len
    if cache_len > m.config.sequence_len:
        raise ConfigError(f"--input-len + --output-len = {cache_len} exceeds the model's context "
                          f"{m.config.sequence_len}")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, m.config.vocab_size, (num_prompts, input_len), generator=g).tolist()
    engine = Engine(m, kv_cache_dtype=kv_cache_dtype)  # no stop tokens: every request makes output_len
    done, elapsed = _timed(engine, prompts, output_len, batch_size, cache_len)
    scheduler_timing = engine.last_timing
    dev = m.lm_head.weight.device
    result = {
        "backend": backend, "model": str(loaded.checkpoint or loaded.recipe), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(m.lm_head.weight.dtype).removeprefix("torch."), "cuda_graphs": engine.cuda_graphs,
        "compiled": bool(loaded.plan is not None and loaded.plan.compiled),
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "batch_size": batch_size,
        "kv_cache_dtype": kv_cache_dtype, **summarize(done, elapsed, input_len), "scheduler": scheduler_timing,
        "batch1": None, "compare": None,
    }  # fmt: skip
    if dev.type == "cuda":
        result["batch1"] = batch1_bandwidth(loaded, engine, prompts, output_len, cache_len)
    if compare == "hf":
        runs = [{"batch_size": b, **hf_static_generate(m, prompts, output_len, b)}
                for b in dict.fromkeys(hf_batch_sizes or [batch_size])]  # fmt: skip
        best = max(runs, key=lambda r: r["output_tokens_per_s"])
        ratio = result["output_tokens_per_s"] / best["output_tokens_per_s"]
        result["compare"] = {"hf": {**best, "ratio": ratio, "runs": runs}}
    return result


def run_vllm_bench(path, num_prompts: int, input_len: int, output_len: int, *, dtype: str = "auto",
                   seed: int = 0) -> dict:
    """The same benchmark through vLLM (vllm_backend): every request submitted at once, EOS ignored.

    vLLM's offline API hands back all requests together, so per-request TTFT and latency are not measured
    (None); throughput and the mean latency per prompt are.
    """
    from ghostvis_core.sampling import SamplingParams
    from ghostvis_core.vllm_backend import create_vllm_engine

    with create_vllm_engine(path, dtype=dtype) as engine:
        if input_len + output_len > engine.max_model_len:
            raise ConfigError(f"--input-len + --output-len = {input_len + output_len} exceeds the model's context "
                              f"{engine.max_model_len}")
        import json

        vocab = json.loads((engine.folder / "config.json").read_text("utf-8"))
        vocab = vocab.get("text_config", vocab)["vocab_size"]
        g = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, vocab, (num_prompts, input_len), generator=g).tolist()
        sampling = SamplingParams(ignore_eos=True)
        engine.generate_ids(prompts[:1], sampling, 2)  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate_ids(prompts, sampling, output_len)
        elapsed = time.perf_counter() - t0
        config = json.loads((engine.folder / "config.json").read_text("utf-8"))
    out_tokens = sum(len(o["token_ids"]) for o in outs)
    return {
        "backend": "vllm", "model": str(engine.source or engine.folder), "device": "cpu" if not
        torch.cuda.is_available() else "cuda", "device_name": "cpu" if not torch.cuda.is_available() else
        torch.cuda.get_device_name(), "dtype": config.get("dtype", dtype), "cuda_graphs": False,
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "batch_size": None,
        "elapsed_s": elapsed, "requests_per_s": num_prompts / elapsed, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + num_prompts * input_len) / elapsed,
        "latency_ms_per_prompt": 1e3 * elapsed / num_prompts, "ttft_ms": None, "latency_ms": None,
        "batch1": None, "compare": None,
    }  # fmt: skip


def _step_kind(r: dict) -> str:
    step = "compiled" if r.get("compiled") else "eager"
    return f"CUDA graphs of the {step} decode step" if r["cuda_graphs"] else f"{step} decode step"


def format_infer_bench(r: dict) -> str:
    """The seed's result block plus the per-request and bandwidth figures."""
    engine = "vLLM" if r["backend"] == "vllm" else _step_kind(r)
    batch = f", batch {r['batch_size']}" if r["batch_size"] else " (vLLM schedules the batch)"
    lines = [
        "=== Benchmark Results ===",
        f"Backend: {r['backend']} ({engine}), {r['device_name']}, {r['dtype']}, model {r['model']}",
        f"Prompts: {r['num_prompts']} x {r['input_len']} tokens in, {r['output_len']} out{batch}"
        + (", KV cache fp8 e4m3 (per-token scales)" if r.get("kv_cache_dtype") == "fp8" else ""),
        f"Throughput: {r['output_tokens_per_s']:,.1f} tokens/sec (output)",
        f"Latency: {r['latency_ms_per_prompt']:,.2f} ms/prompt",
        f"Requests/s: {r['requests_per_s']:,.2f}   total tokens/s: {r['total_tokens_per_s']:,.1f}",
    ]
    if r["ttft_ms"] is None:
        lines.append("TTFT and request latency: not measured (vLLM's offline API returns every request at once)")
    else:
        lines += [
            "TTFT ms: mean {mean:,.1f}  p50 {p50:,.1f}  p99 {p99:,.1f}".format(**r["ttft_ms"]),
            "Request latency ms: p50 {p50:,.1f}  p90 {p90:,.1f}  p99 {p99:,.1f}".format(**r["latency_ms"]),
        ]
    if r.get("scheduler"):
        from ghostvis_core.scheduler import Scheduler

        lines.append("Scheduler " + Scheduler.format_timing(r["scheduler"]))
    if r["batch1"]:
        b = r["batch1"]
        lines.append(f"Batch-1 decode: {b['decode_tokens_per_s']:,.0f} tok/s x {b['weight_bytes_per_token'] / 1e9:.2f}"
                     f" GB of weights = {b['weights_gb_s']:,.0f} GB/s, {b['pct_of_copy']:.0f}% of a device copy "
                     f"({b['copy_gb_s']:,.0f} GB/s)")  # fmt: skip
    if r["compare"]:
        hf = r["compare"]["hf"]
        runs = hf.get("runs", [])
        if len(runs) > 1:
            each = ", ".join(f"batch {x['batch_size']} {x['output_tokens_per_s']:,.1f}" for x in runs)
            lines.append(f"HF transformers (static cache) tokens/sec: {each}")
        lines.append(f"HF transformers (static cache): {hf['output_tokens_per_s']:,.1f} tokens/sec at batch "
                     f"{hf.get('batch_size', r['batch_size'])}{' (its best)' if len(runs) > 1 else ''}; "
                     f"native / HF = {hf['ratio']:.2f}x")  # fmt: skip
    return "\n".join(lines)
