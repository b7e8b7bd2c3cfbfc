"""The decode attention kernels alone: the Triton split-KV kernel over its tile and launch settings, against
flash_attn_with_kvcache over its split counts, on the decode shapes of a preset.

    python -m ghostvis_core.bench.decode_attention [--preset d20] [--rows 1:200 64:200 64:320 256:256]
        [--slots 384] [--top 8] [--defaults-only] [--fp8] [--json]

Each --rows entry is BATCH:CACHED (tokens already in each row's cache); every row of the batch holds that many.
One call attends one new token per row and writes its K/V, exactly as a decode step does. Time: median of CUDA-
graph replays (triton.testing.do_bench_cudagraph), so launch overhead is what a captured step pays. GB/s counts
the K and V bytes the call must read, B * K * (cached + 1) * D * 2 tensors * element size, against a device copy
measured in the same run. On the CPU (a smoke run) only the Triton interpreter's defaults run, timed by the clock.
--fp8 adds the kernel over an fp8 e4m3 cache (kv_cache.py), its bytes one per element plus one fp32 scale per
(token, KV head): with --defaults-only its own tile with and without PDL, otherwise tiles of 16-128 slots under 2
or 4 warps (the bf16 kernel then runs its defaults only, as the reference).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time

import torch

from ghostvis_core.bench.timing import copy_bandwidth, gb_per_s

BLOCK_N = (16, 32, 64, 128)
NUM_WARPS = (2, 4, 8)
NUM_STAGES = (1, 2, 3, 4)
SPLITS = (None, 1, 2, 4, 8, 16)  # None: the kernel's own choice (num_splits)
FA_SPLITS = (0, 1, 2, 4, 8)  # 0: flash-attn's heuristic


def _inputs(batch: int, cached: int, slots: int, heads: int, kv_heads: int, head_dim: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q = rand(batch, heads, head_dim)
    k_new, v_new = rand(batch, kv_heads, head_dim), rand(batch, kv_heads, head_dim)
    k_cache, v_cache = rand(batch, slots, kv_heads, head_dim), rand(batch, slots, kv_heads, head_dim)
    lens = torch.full((batch,), cached, dtype=torch.int32, device=device)
    return q, k_new, v_new, k_cache, v_cache, lens


def _time_ms(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return float(do_bench_cudagraph(fn, rep=10))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def triton_configs(device, defaults_only: bool = False) -> list[dict]:
    """The sweep's Triton settings; defaults_only: the kernel's own tile, launched with and without
    programmatic dependent launch."""
    if device.type != "cuda":
        return [{}]
    if defaults_only:
        return [dict(pdl=False), dict(pdl=True)]
    return [dict(block_n=b, num_warps=w, num_stages=s, splits=p)
            for b, w, s, p in itertools.product(BLOCK_N, NUM_WARPS, NUM_STAGES, SPLITS)]  # fmt: skip


def sweep_rows(batch: int, cached: int, slots: int, heads: int, kv_heads: int, head_dim: int, device,
               defaults_only: bool = False, fp8: bool = False, forms: bool = False) -> list[dict]:  # fmt: skip
    """Every Triton setting (triton_configs) and every flash-attn split count on one shape; fastest first.
    fp8: also the kernel's defaults over the same cache quantized to e4m3 (kernel "triton_fp8").
    forms: each of those rows also with the kernel's 2-D form (one query head per KV head) turned off, so its
    gain is timed in the same process."""
    from ghostvis_core.kernels.decode_attention_triton import decode_attention_triton

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k_new, v_new, k_cache, v_cache, lens = _inputs(batch, cached, slots, heads, kv_heads, head_dim, device, dtype)
    nbytes = batch * kv_heads * (cached + 1) * head_dim * 2 * k_cache.element_size()
    rows = []
    off = [{}, {"flat": False}] if forms and heads == kv_heads else [{}]
    for cfg in [c | o for c in triton_configs(device, defaults_only or fp8) for o in off]:
        kw = {k: v for k, v in cfg.items() if k != "splits"}
        ms = _time_ms(functools.partial(decode_attention_triton, q, k_new, v_new, k_cache, v_cache, lens,
                                        cfg.get("splits"), **kw), device)  # fmt: skip
        rows.append({"kernel": "triton", **cfg, "ms": ms, "bytes": nbytes})
    if fp8:
        from ghostvis_core.kv_cache import quantize_fp8

        (k8, ks), (v8, vs) = quantize_fp8(k_cache), quantize_fp8(v_cache)
        fp8_bytes = batch * kv_heads * (cached + 1) * 2 * (head_dim + 4)
        fp8_cfgs = triton_configs(device, defaults_only=True)
        if not defaults_only and device.type == "cuda":
            fp8_cfgs = [dict(block_n=b, num_warps=w) for b, w in itertools.product(BLOCK_N, NUM_WARPS[:2])]
        for cfg in [c | o for c in fp8_cfgs for o in off]:
            ms = _time_ms(functools.partial(decode_attention_triton, q, k_new, v_new, k8, v8, lens, None,
                                            k_scale_BSK=ks, v_scale_BSK=vs, **cfg), device)  # fmt: skip
            rows.append({"kernel": "triton_fp8", **cfg, "ms": ms, "bytes": fp8_bytes})
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError as e:
            rows.append({"kernel": "flash_attn", "status": "absent", "reason": str(e)})
        else:
            q4, kn4, vn4 = q[:, None], k_new[:, None], v_new[:, None]
            for n in FA_SPLITS:
                ms = _time_ms(functools.partial(flash_attn_with_kvcache, q4, k_cache, v_cache, k=kn4, v=vn4,
                                                cache_seqlens=lens, causal=True, num_splits=n), device)  # fmt: skip
                rows.append({"kernel": "flash_attn", "splits": n, "ms": ms, "bytes": nbytes})
    for r in rows:
        if "ms" in r:
            r["gb_s"] = round(gb_per_s(r.pop("bytes"), r["ms"]), 1)
            r["ms"] = round(r["ms"], 5)
    return sorted(rows, key=lambda r: r.get("ms", float("inf")))


def main(argv: list[str] | None = None) -> int:
    from ghostvis_core.model_configs import get_preset

    p = argparse.ArgumentParser(prog="python -m ghostvis_core.bench.decode_attention", description=__doc__)
    p.add_argument("--preset", default="d20")
    p.add_argument("--rows", nargs="+", default=["1:200", "64:200", "64:320", "256:256"], help="BATCH:CACHED")
    p.add_argument("--slots", type=int, default=384)
    p.add_argument("--top", type=int, default=8, help="rows printed per shape (all with --json)")
    p.add_argument("--defaults-only", action="store_true",
                   help="only the kernel's own tile, with and without programmatic dependent launch")
    p.add_argument("--fp8", action="store_true", help="add the kernel's defaults over an fp8 e4m3 cache")
    p.add_argument("--forms", action="store_true",
                   help="also time the kernel with its 2-D form (one query head per KV head) turned off")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cfg = get_preset(a.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy = copy_bandwidth().gb_s if device.type == "cuda" else None
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "copy_gb_s": copy,
           "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "head_dim": cfg.n_embd // cfg.n_head}  # fmt: skip
    if a.json:  # one line per shape as it finishes: a sweep cut short keeps what it measured
        print(json.dumps(out), flush=True)
    else:
        print(f"{out['device']}  copy {copy and round(copy)} GB/s  heads {out['heads']}/{out['kv_heads']} "
              f"x {out['head_dim']}")  # fmt: skip
    for spec in a.rows:
        batch, cached = (int(x) for x in spec.split(":"))
        rows = sweep_rows(batch, cached, a.slots, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head, device,
                          a.defaults_only, a.fp8, a.forms)
        shape = {"batch": batch, "cached": cached, "slots": a.slots, "rows": rows}
        if a.json:
            print(json.dumps(shape), flush=True)
            continue
        print(f"\nbatch {batch}, {cached} cached of {a.slots} slots")
        fa = [r for r in rows if r["kernel"] == "flash_attn" and "ms" in r]
        extra = fa[:1] + [r for r in rows if r["kernel"] == "triton_fp8"][:1]
        for r in rows[: a.top] + [r for r in extra if r not in rows[: a.top]]:
            print("  " + "  ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
