"""Time one decode step of the native engine per variant: fused projections or not, each decode attention backend.

    python -m ghostvis_core.bench.decode_step [--preset d20] [--batch 1 64] [--cached 200] [--slots 384]
        [--attn auto flash_attn] [--unfused] [--pdl default|on|off ...] [--kv-cache-dtype auto fp8]
        [--layers plan torch triton] [--sweep-fused] [--census] [--json]

Random weights, the plan's dtype (bf16 on CUDA). Each row builds the engine's static batch of --slots cache
slots per row with --cached tokens already cached, then replays the decode step (compiled and CUDA-graph
captured on CUDA, as `ghostvis bench` runs it) 100 times: ms per step, tok/s = batch / step. --attn names the
decode attention request (auto: the plan's choice). --unfused adds rows with the q|k|v and gate|up weights
kept apart (the pre-fusion step). --pdl times the step generated with programmatic dependent launch (Hopper
and later) as the engine sets it, forced on, or forced off, in the order given. --kv-cache-dtype times the
step over each cache storage (fp8: e4m3 with per-token scales, kv_cache.py). --census adds a profiler kernel
count and the largest kernels of the compiled step run without its graph. --layers times the step's layers as
the plan runs them, as the PyTorch layers, and as the fused small-batch kernels of decode_layers.py (up to its
batch limit; the PyTorch layers above it). --sweep-fused times the fused step with each projection's kernel
tile varied in turn (kernels/decode_linear_triton.CONFIG_OVERRIDES), the others at their defaults. On the CPU it runs eagerly (a
smoke run: no graph, no compile).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

from ghostvis_core.bench.infer_bench import random_model
from ghostvis_core.bench.timing import sync

REPLAYS = 100


def _set_fused(model, on: bool, saved: list) -> None:
    """Keep (on) or hide (off) each layer's fused weights; the views stay the parameters either way."""
    if not saved:
        saved.extend((b.self_attn.qkv_weight, b.mlp.gate_up_weight) for b in model.model.layers)
    for block, (qkv, gate_up) in zip(model.model.layers, saved, strict=True):
        block.self_attn.qkv_weight = qkv if on else None
        block.mlp.gate_up_weight = gate_up if on else None


def time_step(model, batch_size: int, slots: int, cached: int, census: bool, pdl: bool | None = None,
              kv_cache_dtype: str = "auto", engine=None) -> dict:
    """ms per replayed decode step of a (batch_size, slots) batch holding `cached` tokens per row; pdl: the
    step generated with programmatic dependent launch on or off (None: the engine's default). engine: reuse
    that engine's compiled step (a fresh batch and graph), else compile a new one."""
    from ghostvis_core.batch_engine import Engine

    if engine is None:
        torch._dynamo.reset()  # each row compiles its own step
        engine = Engine(model, inductor_options=None if pdl is None else {"triton.enable_pdl": pdl},
                        kv_cache_dtype=kv_cache_dtype)
    engine._batches.clear()
    batch = engine.batch(batch_size, slots)
    device = batch.tokens.device
    row: dict = {"batch": batch_size, "decode": model.plan.attention["decode"].label,
                 "layers": model.plan.decode_layers.backend}
    with torch.no_grad():
        batch.cache.cache_seqlens.fill_(cached)
        step = engine.step_fn(batch, "greedy")
        for _ in range(5):
            step()
        sync(device)
        batch.cache.cache_seqlens.fill_(cached)  # the replays write slots cached .. cached + 99 (clamped)
        t0 = time.perf_counter()
        for _ in range(REPLAYS):
            step()
        sync(device)
        row["ms_per_step"] = (time.perf_counter() - t0) * 1e3 / REPLAYS
        row["tokens_per_s"] = batch_size / row["ms_per_step"] * 1e3
        if census and device.type == "cuda":
            row.update(_census(engine, batch, cached))
    return row


def _census(engine, batch, cached: int) -> dict:
    from ghostvis_core.bench.timing import kernel_census

    batch.cache.cache_seqlens.fill_(cached)
    census = kernel_census(lambda: engine._step_impl(batch, "greedy"), runs=10, top=10)
    return {"kernels_per_step": census["kernels_per_run"], "gpu_ms_per_step": census["gpu_ms_per_run"],
            "gpu_ms_by_category": census["gpu_ms_by_category"], "largest": census["largest"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="d20")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--cached", type=int, default=200, help="tokens already in each row's cache")
    p.add_argument("--slots", type=int, default=384, help="cache slots per row")
    p.add_argument("--attn", nargs="+", default=["auto", "flash_attn"], help="decode attention requests")
    p.add_argument("--unfused", action="store_true", help="also time the step with unfused projections")
    p.add_argument("--pdl", nargs="+", choices=["default", "on", "off"], default=["default"],
                   help="programmatic dependent launch in the step: the engine's setting, on, off")
    p.add_argument("--kv-cache-dtype", nargs="+", choices=["auto", "fp8"], default=["auto"],
                   help="KV cache storage of each row (in the order given)")
    p.add_argument("--layers", nargs="+", choices=["plan", "torch", "triton"], default=["plan"],
                   help="the step's layers as planned, the PyTorch layers, or the fused Triton kernels")
    p.add_argument("--sweep-fused", action="store_true", help="vary each fused projection's tile in turn")
    p.add_argument("--census", action="store_true", help="profile the kernels of each step (CUDA)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: this machine's GPU, else CPU)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.cached < args.slots:
        p.error(f"--cached {args.cached} must be below --slots {args.slots}")
    from ghostvis_core.errors import GhostVisError

    try:
        rows = _rows(args)
    except GhostVisError as exc:  # a backend this machine cannot run, an unknown preset: one message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _rows(args) -> list[dict]:
    from ghostvis_core.decode_layers import with_decode_layers

    rows = []
    for attn in args.attn:
        model = random_model(args.preset, args.device, "auto", attn=attn).model
        planned = model.plan
        saved: list = []
        for fused, layers in itertools.product((True, False) if args.unfused else (True,), args.layers):
            if layers == "triton" and not fused:
                continue  # the fused kernels read the fused q|k|v and gate|up weights: that row would be torch's
            _set_fused(model, fused, saved)
            model.plan = with_decode_layers(planned, layers)
            for kv, pdl, batch_size in itertools.product(args.kv_cache_dtype, args.pdl, args.batch):
                on = {"default": None, "on": True, "off": False}[pdl]
                row = {"attn": attn, "fused": fused, "pdl": pdl, "kv_cache_dtype": kv,
                       **time_step(model, batch_size, args.slots, args.cached, args.census, on, kv)}  # fmt: skip
                rows.append(row)
                _print(args, row)
        if args.sweep_fused:
            model.plan = with_decode_layers(planned, "triton")
            rows += sweep_fused(model, args)
        model.plan = planned
        del model
    return rows


def _print(args, row: dict, note: str = "") -> None:
    if args.json:
        return
    print(f"{row['attn']:>10} fused={row['fused']!s:5} layers={row['layers']:6} pdl={row['pdl']:7} "
          f"kv={row['kv_cache_dtype']:4} B={row['batch']:4d}  {row['ms_per_step']:8.3f} ms/step "
          f"{row['tokens_per_s']:10,.0f} tok/s  ({row['decode']}){note}", flush=True)  # fmt: skip
    for name, ms, count in row.get("largest", []):
        print(f"    {ms:8.3f} ms  x{count:4.0f}  {name}")


SWEEP = {  # epilogue -> (BLOCK_N, BLOCK_K, num_warps) tried for it, around default_config's choice
    "rope": [(b, k, w) for b in (1, 2) for k in (512, 1024, 2048) for w in (1, 2)],
    "residual": [(b, k, w) for b in (2, 4) for k in (1024, 2048) for w in (1, 2)],
    "swiglu": [(b, k, w) for b in (1, 2) for k in (512, 1024, 2048) for w in (1, 2)],
    "plain": [(b, k, w) for b in (8, 16, 64) for k in (512, 1024) for w in (2, 4)],
}


def sweep_fused(model, args) -> list[dict]:
    """The fused step of the first --batch size, one projection's tile varied at a time (the rest default)."""
    from ghostvis_core.batch_engine import Engine
    from ghostvis_core.kernels import decode_linear_triton as kernels

    c = model.config
    H, K, D, C, F = c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.mlp_hidden
    shapes = [("rope", (H + 2 * K) * D, C), ("residual", C, H * D), ("swiglu", F, C), ("residual", C, F),
              ("plain", c.vocab_size, C)]  # fmt: skip
    torch._dynamo.reset()
    engine = Engine(model, kv_cache_dtype=args.kv_cache_dtype[0])
    batch_size, rows = args.batch[0], []
    for epilogue, n_out, k in shapes:
        for config in SWEEP[epilogue]:
            kernels.CONFIG_OVERRIDES.clear()
            kernels.CONFIG_OVERRIDES[epilogue, n_out, k] = config
            row = {"attn": "sweep", "fused": True, "pdl": "default", "kv_cache_dtype": args.kv_cache_dtype[0],
                   "shape": [epilogue, n_out, k], "config": list(config),
                   **time_step(model, batch_size, args.slots, args.cached, False, engine=engine)}  # fmt: skip
            rows.append(row)
            _print(args, row, f"  {epilogue} {n_out}x{k} tile {config}")
    kernels.CONFIG_OVERRIDES.clear()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
