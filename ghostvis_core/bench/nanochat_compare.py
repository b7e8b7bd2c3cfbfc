"""Training-step throughput of GhostVis against nanochat's own model and optimizer, one process, same card.

    python -m ghostvis_core.bench.nanochat_compare [--nanochat-root .gpu/nanochat] [--out FILE.json]
    python -m ghostvis_core.bench.nanochat_compare --fit d26:8,16,24 --fit d20:32,48   (activation checkpointing)
    python -m ghostvis_core.bench.nanochat_compare --tiny                               (CPU smoke run)
    python -m ghostvis_core.bench.nanochat_compare --only nanochat_fp8 ghostvis_fp8_adamw --profile

Rows, each measured in this process one after another (same B, T, vocab, width; torch.compile; warm-up steps,
then timed steps; random tokens):
  nanochat_bf16   nanochat's `GPT` (window_pattern "L": SDPA, FA3 is not assumed) and its `MuonAdamW`
  nanochat_fp8    the same with nanochat's own fp8 (its convert_to_float8_training, tensorwise, the filter of
                  its base_train: dims divisible by 16 and >= 128)
  ghostvis_bf16   GhostVis `GPT`, the trainer's default configuration (Muon + AdamW, blocks compiled)
  ghostvis_fp8    the same with --fp8 tensorwise (torchao)
  ghostvis_adamw  GhostVis `GPT` with fused AdamW only (how much Muon costs)
  ghostvis_fp8_adamw  the same with --fp8 tensorwise (what fp8 gains the forward and backward alone)
  ghostvis_fp8_head   ghostvis_fp8 with lm_head in float8 too (fp8.LM_HEAD_FP8 on for the row), as nanochat_fp8
nanochat's source is not part of GhostVis: point --nanochat-root at a checkout whose `nanochat/` package holds its
gpt.py, optim.py, fp8.py, flash_attention.py, common.py (the nanochat rows are skipped, saying so, without it).

MFU: each model's own FLOPs-per-token formula (nanochat `estimate_flops`, GhostVis `flops_per_token`, the same
6 N + 12 L H D T form) against the card's dense bf16 peak (hardware_limits).

--fit PRESET:B1,B2,...: for each activation_checkpointing mode (none, selective, full) and batch size, one short
run of the default GhostVis configuration at T=--seq-len: fits (tok/s, peak GiB) or out of memory.

--profile: after each row's timed steps, 2 more under torch.profiler: GPU ms per step by kernel kind (bf16 and
fp8 GEMMs, attention, Triton, other) and the largest kernels, in the JSON under the row's "census".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ghostvis_core.bench.timing import sync

NANOCHAT_FILES = ("gpt.py", "optim.py", "fp8.py", "flash_attention.py", "common.py")


def _free(device: torch.device, compiled: bool = True) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        torch._dynamo.reset()  # each row compiles its own graphs; none count against the next row's limits


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, tokens: int, warmup: int,
               steps: int, profile: bool = False) -> dict:
    """Run `warmup` steps (compilation), then time `steps` back to back; tok/s, step ms, peak GiB, last loss;
    profile: then profile 2 more steps (bench.timing.kernel_census: GPU ms per kernel kind, largest kernels)."""
    for _ in range(warmup):
        loss = step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"step_ms": 1000 * step_s, "tok_per_s": tokens / step_s, "peak_gib": peak,
           "final_loss": float(loss.detach().float().item())}
    if profile and device.type == "cuda":
        from ghostvis_core.bench.timing import kernel_census

        out["census"] = kernel_census(step, runs=2, top=15)
    return out


# ---------------------------------------------------------------------------------------------------------
# nanochat


def load_nanochat(root: Path):
    """nanochat's gpt and fp8 modules from `root`/nanochat, or None with the reason when they are not there."""
    missing = [f for f in NANOCHAT_FILES if not (root / "nanochat" / f).is_file()]
    if missing:
        return None, f"no nanochat source under {root}/nanochat (missing {', '.join(missing)})"
    sys.path.insert(0, str(root))
    import nanochat.fp8 as nanochat_fp8
    import nanochat.gpt as nanochat_gpt

    return (nanochat_gpt, nanochat_fp8), None


def nanochat_row(modules, shape: dict, device: torch.device, fp8: bool, compile: bool, warmup: int,
                 steps: int, profile: bool = False) -> dict:
    """nanochat's GPT + MuonAdamW as its base_train builds them (meta init, to_empty, init_weights)."""
    gpt_mod, fp8_mod = modules
    config = gpt_mod.GPTConfig(sequence_len=shape["T"], vocab_size=shape["V"], n_layer=shape["L"],
                               n_head=shape["H"], n_kv_head=shape["H"], n_embd=shape["C"], window_pattern="L")
    with torch.device("meta"):
        model = gpt_mod.GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    converted = 0
    if fp8:
        def keep(mod, fqn):  # base_train's filter
            return (isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                    and min(mod.in_features, mod.out_features) >= 128)

        fp8_mod.convert_to_float8_training(model, config=fp8_mod.Float8LinearConfig.from_recipe_name("tensorwise"),
                                           module_filter_fn=keep)
        converted = sum(1 for m in model.modules() if "Float8" in type(m).__name__)
    flops = model.estimate_flops()
    optimizer = model.setup_optimizer()
    step_model = torch.compile(model, dynamic=False) if compile else model
    x, y = _tokens(shape, device)
    step = _train_step(lambda: step_model(x, y), optimizer, model.zero_grad)
    out = time_steps(step, device, x.numel(), warmup, steps, profile)
    out.update(flops_per_token=flops, what=f"nanochat GPT + MuonAdamW{f', fp8 on {converted} linears' if fp8 else ''}")
    return out  # the model, its compiled wrapper and the optimizer go with this frame


# ---------------------------------------------------------------------------------------------------------
# GhostVis


def ghostvis_row(shape: dict, device: torch.device, optimizer: str, fp8: str, compile: bool, warmup: int, steps: int,
                 preset: str = "d20", batch: int | None = None, activation_checkpointing: str = "none",
                 profile: bool = False, head_fp8: bool = False) -> dict:
    """GhostVis GPT, planned, converted, compiled and optimised by the functions the trainer calls;
    head_fp8: fp8.LM_HEAD_FP8 on while the row runs."""
    from ghostvis_core import fp8 as fp8_module

    saved, fp8_module.LM_HEAD_FP8 = fp8_module.LM_HEAD_FP8, head_fp8 or fp8_module.LM_HEAD_FP8
    try:
        return _ghostvis_row(shape, device, optimizer, fp8, compile, warmup, steps, preset, batch,
                             activation_checkpointing, profile)
    finally:
        fp8_module.LM_HEAD_FP8 = saved


def _ghostvis_row(shape, device, optimizer, fp8, compile, warmup, steps, preset, batch, activation_checkpointing,
                  profile) -> dict:
    from ghostvis_core.backends import plan_run, training_run_facts
    from ghostvis_core.config import OptimizerConfig
    from ghostvis_core.env import probe_env
    from ghostvis_core.fp8 import convert_to_fp8, lm_head_in_fp8
    from ghostvis_core.gpt import GPT
    from ghostvis_core.model_configs import get_preset
    from ghostvis_core.optim import build_optimizer

    overrides = {"sequence_len": shape["T"], "vocab_size": shape["V"]}
    if preset == "custom":
        config = get_preset("d20", **overrides, n_layer=shape["L"], n_head=shape["H"], n_kv_head=shape["H"],
                            n_embd=shape["C"])
    else:
        config = get_preset(preset, **overrides)
    env = probe_env()
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    facts = training_run_facts(env, config, device_type=device.type, compile=compile, dtype=dtype,
                               optimizer=optimizer, fp8=fp8, activation_checkpointing=activation_checkpointing)
    plan = plan_run(env, facts)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config, plan)
    converted = convert_to_fp8(model, plan.fp8)
    if plan.compiled:
        model.compile_blocks(dynamic=False)
    opt, description = build_optimizer(model, OptimizerConfig(backend=optimizer), plan)
    x, y = _tokens({**shape, "B": batch or shape["B"]}, device)

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model(x, y)

    out = time_steps(_train_step(loss, opt, opt.zero_grad), device, x.numel(), warmup, steps, profile)
    out.update(flops_per_token=model.flops_per_token(shape["T"]), what=description
               + (f"; fp8 {plan.fp8.label} on {len(converted)} linears" if converted else "")
               + ("; lm_head fp8" if lm_head_in_fp8(plan.fp8, config.n_embd, config.vocab_size) else "")
               + (f"; activation checkpointing {plan.activation_checkpointing.label}"
                  if activation_checkpointing != "none" else ""))
    return out


def _train_step(loss_fn: Callable[[], torch.Tensor], optimizer, zero_grad: Callable) -> Callable[[], torch.Tensor]:
    """One training step: forward, backward, optimizer step, gradients to None; returns the loss."""

    def step():
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        zero_grad(set_to_none=True)
        return loss

    return step


def _tokens(shape: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, shape["V"], (shape["B"], shape["T"]), generator=g).to(device)
    return x, torch.roll(x, -1, dims=1)


# ---------------------------------------------------------------------------------------------------------
# Driver


def run_compare(args) -> dict:
    """Every row that can run here; skipped rows say why."""
    from ghostvis_core.hardware_limits import peak_bf16_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = dict(B=args.batch_size, T=args.seq_len, V=args.vocab, L=args.layers, H=args.heads, C=args.width)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = peak_bf16_flops(name)
    compile = not args.no_compile
    result = {"device": name, "torch": torch.__version__, "shape": shape, "compile": compile,
              "warmup": args.warmup, "steps": args.steps, "rows": {}, "skipped": {}}
    modules, why = load_nanochat(Path(args.nanochat_root))
    cuda = device.type == "cuda"
    plans: list[tuple[str, Callable[[], dict]]] = []
    if modules is not None:
        plans.append(("nanochat_bf16", lambda: nanochat_row(modules, shape, device, False, compile, args.warmup,
                                                            args.steps, args.profile)))
        plans.append(("nanochat_fp8", lambda: nanochat_row(modules, shape, device, True, compile, args.warmup,
                                                           args.steps, args.profile)))
    else:
        result["skipped"]["nanochat_bf16"] = result["skipped"]["nanochat_fp8"] = why
    custom = "custom"
    plans += [
        ("ghostvis_bf16", lambda: ghostvis_row(shape, device, "auto", "none", compile, args.warmup, args.steps,
                                               custom, profile=args.profile)),
        ("ghostvis_fp8", lambda: ghostvis_row(shape, device, "auto", "tensorwise", compile, args.warmup,
                                              args.steps, custom, profile=args.profile)),
        ("ghostvis_adamw", lambda: ghostvis_row(shape, device, "adamw", "none", compile, args.warmup, args.steps,
                                                custom, profile=args.profile)),
        ("ghostvis_fp8_adamw", lambda: ghostvis_row(shape, device, "adamw", "tensorwise", compile, args.warmup,
                                                    args.steps, custom, profile=args.profile)),
        ("ghostvis_fp8_head", lambda: ghostvis_row(shape, device, "auto", "tensorwise", compile, args.warmup,
                                                   args.steps, custom, profile=args.profile, head_fp8=True)),
    ]
    for row, measure in plans:
        if args.only is not None and row not in args.only:
            continue
        if "_fp8" in row and not cuda:  # nanochat's base_train also turns --fp8 off without CUDA
            result["skipped"][row] = "fp8 needs a CUDA GPU (the plan refuses it on the CPU)"
            continue
        try:
            out = measure()
        except torch.cuda.OutOfMemoryError as err:
            result["skipped"][row] = f"out of memory: {str(err).splitlines()[0]}"
            _free(device, compile)
            continue
        out["mfu"] = out["tok_per_s"] * out["flops_per_token"] / peak if peak else None
        result["rows"][row] = out
        print(_row_line(row, out), flush=True)
        _free(device, compile)
    rows = result["rows"]
    ratios = {}
    for ours, theirs in (("ghostvis_bf16", "nanochat_bf16"), ("ghostvis_fp8", "nanochat_fp8"),
                         ("ghostvis_bf16", "ghostvis_adamw"), ("ghostvis_fp8", "ghostvis_bf16"),
                         ("ghostvis_fp8_adamw", "ghostvis_adamw"), ("ghostvis_fp8_head", "nanochat_fp8"),
                         ("ghostvis_fp8_head", "ghostvis_fp8")):
        if ours in rows and theirs in rows:
            ratios[f"{ours}/{theirs}"] = rows[ours]["tok_per_s"] / rows[theirs]["tok_per_s"]
    result["ratios"] = ratios
    if args.fit:
        result["fit"] = run_fit(args.fit, shape, device, compile, peak, min(args.warmup, 2), min(args.steps, 3))
    return result


def run_fit(specs: list[str], shape: dict, device: torch.device, compile: bool, peak, warmup: int,
            steps: int) -> list[dict]:
    """--fit PRESET:B1,B2: which batch sizes fit per activation-checkpointing mode (a few timed steps each)."""
    out = []
    for spec in specs:
        preset, _, batches = spec.partition(":")
        for mode in ("none", "selective", "full"):
            for batch in [int(b) for b in batches.split(",") if b]:
                entry = {"preset": preset, "batch_size": batch, "seq_len": shape["T"], "activation_checkpointing": mode}
                try:
                    r = ghostvis_row(shape, device, "auto", "none", compile, warmup, steps, preset, batch, mode)
                    entry.update(fits=True, tok_per_s=r["tok_per_s"], peak_gib=r["peak_gib"],
                                 mfu=r["tok_per_s"] * r["flops_per_token"] / peak if peak else None)
                except torch.cuda.OutOfMemoryError:
                    entry.update(fits=False)
                _free(device, compile)
                print(f"fit {preset} B={batch} T={shape['T']} ac={mode}: "
                      + (f"{entry['tok_per_s']:,.0f} tok/s, {_gib(entry['peak_gib'])} GiB" if entry["fits"]
                         else "out of memory"), flush=True)
                out.append(entry)
                if not entry["fits"]:
                    break  # larger batches of this mode will not fit either
    return out


def _gib(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row_line(row: str, r: dict) -> str:
    mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    return (f"{row:15} {r['tok_per_s']:>11,.0f} tok/s  MFU {mfu:>6}  peak {_gib(r['peak_gib']):>6} GiB  "
            f"step {r['step_ms']:.1f} ms  loss {r['final_loss']:.3f}  ({r['what']})")


def format_compare(result: dict) -> str:
    """The compact table: one line per row, the ratios, the skipped rows and why."""
    s = result["shape"]
    lines = [f"{result['device']}, torch {result['torch']}, B={s['B']} T={s['T']} V={s['V']} "
             f"{s['L']}x{s['C']} ({s['H']} heads), compile={result['compile']}, "
             f"{result['warmup']} warm-up + {result['steps']} timed steps"]
    lines += [_row_line(row, r) for row, r in result["rows"].items()]
    lines += [f"ratio {k}: {v:.3f}x" for k, v in result["ratios"].items()]
    lines += [f"skipped {k}: {v}" for k, v in result["skipped"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    """Command-line arguments (defaults: the d20 comparison shape)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanochat-root", default=".gpu/nanochat", help="folder holding nanochat/gpt.py etc.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="rows to run (default: all; none with --fit alone)")
    p.add_argument("--fit", action="append", default=[], help="PRESET:B1,B2,... activation-checkpointing sweep")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 steps of each row: GPU ms per kernel kind, largest kernels (CUDA)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 warm-up + 2 steps, no compile (CPU smoke)")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/nanochat_compare.json when OUT is set)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size, args.seq_len, args.vocab, args.layers, args.width, args.heads = 2, 64, 512, 2, 256, 2
        args.warmup, args.steps, args.no_compile = 1, 2, True
    return args


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write the JSON."""
    args = parse_args(argv)
    result = run_compare(args)
    print(format_compare(result), flush=True)
    out = args.out or (str(Path(os.environ["OUT"]) / "nanochat_compare.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
