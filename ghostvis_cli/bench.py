"""`ghostvis bench`: kernel and training-step benchmarks, each against a reference measured in the same run."""

import json

import typer
from rich import box
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(
    help="Benchmarks against plain PyTorch, measured in the same process on the same card. With options "
    "(--num-prompts ...) it runs the inference benchmark; `bench kernels` and `bench train` are subcommands.",
    no_args_is_help=True,
    invoke_without_command=True,
)
console = Console()


def _batch_sizes(text: str | None) -> list[int]:
    """--hf-batch-sizes 64,128,256 -> [64, 128, 256]; a non-integer item is one message naming the flag."""
    from ghostvis_core.errors import ConfigError

    if not text:
        return []
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--hf-batch-sizes takes integers separated by commas, e.g. 64,128,256 (got {text!r})") from None


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _print_kernel_table(title: str, rows: list[dict]) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("impl", no_wrap=True)
    for col in ("fwd GB/s", "fwd %copy", "fwd+bwd GB/s", "fwd+bwd %copy", "rel err"):
        table.add_column(col, justify="right")
    notes = []
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["impl"], "-", "-", "-", "-", r["status"])
            notes.append(f"  {r['impl']}: {r['status']}: {r['reason']}")
            continue
        table.add_row(
            r["impl"], _fmt(r["fwd_gb_s"], 0), _fmt(r["fwd_pct_copy"]), _fmt(r["fwdbwd_gb_s"], 0),
            _fmt(r["fwdbwd_pct_copy"]), f"{r['rel_err']:.1e}",
        )  # fmt: skip
    console.print(table)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)


def _attention_title(rows: list[dict]) -> str:
    first = rows[0]
    shape = "B={batch} H={heads} T={seq_len} D={head_dim} {dtype}".format_map(
        {k: first.get(k, "?") for k in ("batch", "heads", "seq_len", "head_dim", "dtype")}
    )
    docs = next((r["docs_per_row"] for r in rows if r.get("docs_per_row")), None)
    packed = f", packed: {docs} docs/row" if docs else ""
    return f"Attention {shape}, causal{packed}"


def attention_table(rows: list[dict]) -> Table:
    """Compact table of `run_attention_bench()` rows: readable at 80 columns (shape in the title, reasons wrap)."""
    table = Table(
        title=_attention_title(rows),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    # min_width 16 keeps "FlashAttention-2" on one line; the note column takes the rest and wraps
    table.add_column("backend", overflow="fold", min_width=16)
    table.add_column("case", no_wrap=True)
    for header in ("fwd\nms", "fwd+bwd\nms", "fwd\nTFLOP/s", "fwd+bwd\nTFLOP/s"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    previous: tuple[str, str] | None = None
    for r in rows:
        label = r.get("label") or r.get("backend", "?")
        if r.get("status") != "ok":
            status, reason = str(r.get("status", "?")), r.get("reason")
            note = f"{status}: {reason}" if reason else status
            if previous == (label, note):  # e.g. flash-attn absent: one reason for both of its cases
                table.add_row(label, r.get("case", "?"), "-", "-", "-", "-", f"{status}: as above")
                continue
            previous = (label, note)
            table.add_row(label, r.get("case", "?"), "-", "-", "-", "-", note)
            continue
        speedup = r.get("speedup_vs_dense")
        # packed rows carry no TFLOP/s (their FLOPs depend on the document layout): the ratio to dense instead
        note = f"{speedup:.2f}x dense (fwd+bwd)" if speedup is not None else ""
        table.add_row(
            label, r.get("case", "?"), _fmt(r.get("fwd_ms"), 3), _fmt(r.get("fwd_bwd_ms"), 3),
            _fmt(r.get("fwd_tflops"), 0), _fmt(r.get("fwd_bwd_tflops"), 0), note,
        )  # fmt: skip
    return table


@bench_app.callback()
def inference(
    ctx: typer.Context,
    num_prompts: int = typer.Option(1000, "--num-prompts", help="Requests (random token prompts)."),
    input_len: int = typer.Option(128, "--input-len", help="Tokens per prompt."),
    output_len: int = typer.Option(256, "--output-len", help="Tokens generated per request (EOS ignored)."),
    backend: str = typer.Option("native", "--backend", help="native | vllm | auto."),
    model: str = typer.Option(None, "--model", help="A run or checkpoint (default: random weights of --preset)."),
    preset: str = typer.Option(None, "--preset", help="Random-weight model preset (default d20)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows decoded together."),
    compare: str = typer.Option(None, "--compare", help="hf: also time transformers' static-cache generate."),
    hf_batch_sizes: str = typer.Option(None, "--hf-batch-sizes", metavar="B1,B2,...",
                                       help="Batch sizes to time HF at (default: --batch-size); the ratio is "
                                            "against its best."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype",
                                       help="auto (the model's dtype) | fp8 (e4m3, per-token scales: half the "
                                            "cache bytes; sm89+ GPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (errors too)."),
) -> None:
    """Offline inference throughput: requests/s, tokens/s, TTFT and latency percentiles, batch-1 bandwidth."""
    if ctx.invoked_subcommand is not None:
        return
    from ghostvis_core.bench.infer_bench import format_infer_bench, run_infer_bench
    from ghostvis_core.errors import GhostVisError

    try:
        result = run_infer_bench(num_prompts, input_len, output_len, batch_size, model=model, preset=preset,
                                 backend=backend, compare=compare, dtype=dtype,
                                 hf_batch_sizes=_batch_sizes(hf_batch_sizes),
                                 kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    except GhostVisError as exc:
        if not as_json:
            raise
        typer.echo(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(format_infer_bench(result), highlight=False)


@bench_app.command("kernels")
def kernels(
    rms_rows: int = typer.Option(16384, "--rms-rows", help="RMSNorm rows (tokens)."),
    rms_hidden: int = typer.Option(4096, "--rms-hidden", help="RMSNorm hidden size."),
    swiglu_rows: int = typer.Option(16384, "--swiglu-rows", help="SwiGLU rows (tokens)."),
    swiglu_hidden: int = typer.Option(8192, "--swiglu-hidden", help="SwiGLU width of gate, up and output."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float16."),
    iters: int = typer.Option(30, "--iters", help="Timed calls per measurement (median reported)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Also time torch.compile baselines."),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="Also run the attention rows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Triton RMSNorm and SwiGLU against PyTorch and Liger, in GB/s and % of a device copy."""
    from ghostvis_core.bench.kernels_bench import KernelBenchConfig, run_kernel_bench

    cfg = KernelBenchConfig(
        rms_rows=rms_rows, rms_hidden=rms_hidden, swiglu_rows=swiglu_rows, swiglu_hidden=swiglu_hidden,
        dtype=dtype, iters=iters, compile=compile, attention=attention,
    )  # fmt: skip
    result = run_kernel_bench(cfg)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    copy = result["copy"]
    console.print(
        f"{result['device']}  torch {result['torch']}  triton {result['triton']}  "
        f"device-to-device copy: {copy['gb_s']:,.0f} GB/s ({copy['bytes'] / 1e9:.2f} GB moved per copy)"
    )
    _print_kernel_table(f"RMSNorm {rms_rows}x{rms_hidden} {dtype}", result["rms_norm"])
    _print_kernel_table(f"SwiGLU {swiglu_rows}x{swiglu_hidden} {dtype}", result["swiglu"])
    if result["attention"]:
        console.print(attention_table(result["attention"]))
    console.print(
        "Bytes: RMSNorm fwd x+y, bwd x+dy+dx; SwiGLU fwd a+b+out, bwd a+b+dout+da+db. Median of CUDA events."
    )


@bench_app.command("train")
def train(
    preset: str = typer.Option("d20", "--preset", help="Model preset name (`ghostvis train --list`)."),
    seq_len: int = typer.Option(2048, "--seq-len", help="Tokens per sequence."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step."),
    steps: int = typer.Option(10, "--steps", help="Timed training steps (after warm-up)."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile both models."),
    optimizer: str = typer.Option(
        "auto", "--optimizer", help="Our optimizer: auto (the trainer's default: Muon + AdamW), muon or adamw."
    ),
    norm_backend: str = typer.Option(
        "auto", "--norm-backend", help="Our RMSNorm/SwiGLU backend: auto, triton or torch."
    ),
    packed: int = typer.Option(
        0, "--packed", min=0, help="Documents per row (packed rows, document-masked attention); 0 = one per row."
    ),
    fp8: str = typer.Option("none", "--fp8", help="none | tensorwise | rowwise: our block linears in float8."),
    activation_checkpointing: str = typer.Option(
        "none", "--recompute", help="none | full | selective: recompute block activations."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """One optimizer step of a preset with our stack against plain compiled PyTorch, same process and card."""
    from ghostvis_core.bench.train_bench import format_train_bench, run_train_bench

    result = run_train_bench(
        preset=preset,
        seq_len=seq_len,
        batch_size=batch_size,
        steps=steps,
        compile=compile,
        optimizer=optimizer,
        norm_backend=norm_backend,
        packed=packed,
        fp8=fp8,
        activation_checkpointing=activation_checkpointing,
    )
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console.print(format_train_bench(result), highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the app."""
    app.add_typer(bench_app, name="bench")
