"""`ghostvis infer`: one prompt, a batch file, or an interactive chat with a trained run (native engine, or vLLM
for prompts and batch files with --backend vllm|auto)."""

from __future__ import annotations

import sys
import time

import typer
from rich.console import Console

console = Console()
DEFAULT_MAX_TOKENS = 256
err_console = Console(stderr=True)


def infer(
    prompt: str = typer.Option(None, "--prompt", "-p", help="The question (chat runs) or text to continue."),
    model: str = typer.Option(
        None, "--model", help="Run name or folder, a step_NNNNNN checkpoint, or an exported HF Llama folder "
        "(default: the newest chat run, else the newest base run)."
    ),  # fmt: skip
    batch_file: str = typer.Option(None, "--batch-file", help="Prompts: .txt (one a line) or .jsonl ({\"prompt\", \"image\": optional, for vision runs})."),
    output: str = typer.Option(None, "--output", "-o", help="Results file (JSON lines) for --batch-file."),
    resume: bool = typer.Option(False, "--resume", help="Skip prompts whose results --output already holds."),
    chat: bool = typer.Option(False, "--chat", help="Interactive chat: streaming, history, /reset, /exit."),
    backend: str = typer.Option(
        "native", "--backend", help="native | vllm | auto (vLLM when it is usable here and serves the model)."
    ),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Most tokens to generate per reply (default "
                                   f"{DEFAULT_MAX_TOKENS}, or what the context leaves, without a warning)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest set with this mass."),
    top_k: int = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (prompt i of a batch uses seed + i)."),
    stop: list[str] = typer.Option(None, "--stop", help="A string that ends a reply (repeatable)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Rows decoded together for --batch-file."),
    image: str = typer.Option(None, "--image", help="An image file the prompt asks about (vision runs)."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="bfloat16 | float16 | float32 | auto (bf16 on CUDA, fp32 on CPU)."
    ),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="auto (the model's dtype) | fp8 (e4m3 "
                                       "with per-token scales: half the cache bytes; sm89+ GPUs)."),
    model_path: str = typer.Option(None, "--model_path", "--run", "--checkpoint", hidden=True),
    batch_file_alias: str = typer.Option(None, "--batch_file", hidden=True),
    max_tokens_alias: int = typer.Option(None, "--max_tokens", "--max-new-tokens", hidden=True),
    limit: int = typer.Option(None, "--limit", hidden=True, help="Stop after this many new results (tests)."),
) -> None:
    """Answer a prompt, a batch file of prompts, or chat, with a trained run's latest checkpoint."""
    from ghostvis_core.engine import load_for_inference
    from ghostvis_core.errors import ConfigError
    from ghostvis_core.log import setup_logging
    from ghostvis_core.sampling import SamplingParams

    setup_logging()  # the backend banner, notes and warnings go to stderr
    batch_file = batch_file or batch_file_alias
    max_tokens = max_tokens_alias if max_tokens_alias is not None else max_tokens
    warn_capped = max_tokens is not None  # a cap the user chose is worth a warning when it does not fit
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    modes = [name for name, on in (("--prompt", prompt is not None), ("--batch-file", batch_file), ("--chat", chat)) if on]
    if len(modes) != 1:
        raise ConfigError("pass exactly one of --prompt TEXT, --batch-file FILE or --chat"
                          + (f" (got {', '.join(modes)})" if modes else ""))  # fmt: skip
    if prompt is not None and not prompt.strip():
        raise ConfigError("--prompt is empty: pass some text")
    if batch_file and not output:
        raise ConfigError("--batch-file needs --output results.jsonl")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1 (got {max_tokens})")
    if image is not None and prompt is None:
        raise ConfigError("--image goes with --prompt TEXT (in --chat, use /image PATH)")
    prompts = None
    if batch_file:
        from ghostvis_core.batch_io import read_prompts

        prompts = read_prompts(batch_file)  # before loading the model: a bad file fails fast
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=tuple(stop or ()))
    if backend != "native":
        from ghostvis_core.vllm_backend import inference_choice

        choice, path = inference_choice(backend, model or model_path)
        if choice.backend == "vllm":
            with_image = _first_image(prompts or [])
            if chat or image is not None or with_image is not None:
                what = "--chat" if chat else "--image" if image is not None else f"{with_image.where}: an image"
                raise ConfigError(f"{what} is served by the native engine only; "
                                  "drop --backend vllm (or use --backend native)")
            if kv_cache_dtype != "auto":
                raise ConfigError("--kv-cache-dtype sets the native engine's cache; drop it with --backend vllm")
            _infer_vllm(path, prompt, prompts, output, resume, sampling, max_tokens, dtype, limit)
            return
    # A one-shot prompt runs the decode step uncompiled: compiling takes longer than a short answer saves.
    loaded = load_for_inference(model or model_path, dtype=dtype, compile=False if prompt is not None else None)
    loaded.kv_cache_dtype = kv_cache_dtype
    loaded.engine  # noqa: B018 (built now: a cache storage this machine cannot decode from fails before any work)
    console.print(f"model: {loaded.checkpoint} ({loaded.recipe})", highlight=False, markup=False, soft_wrap=True)
    if chat:
        from ghostvis_cli.infer_chat import chat_loop

        chat_loop(loaded, sampling, max_tokens, console, err_console, warn_capped)
    elif prompts is not None:
        _run_batch(loaded, prompts, output, resume, sampling, max_tokens, batch_size, limit, warn_capped)
    else:
        from ghostvis_core.engine import generate_text

        reply = generate_text(loaded, prompt, max_tokens, temperature, top_k, seed, top_p, tuple(stop or ()),
                              image=image, warn_capped=warn_capped)
        console.print(f"[bold]>[/] {prompt}", highlight=False, markup=True)
        console.print(reply, highlight=False, markup=False)


def _run_batch(loaded, prompts, output, resume, sampling, max_tokens, batch_size, limit, warn_capped=True) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ghostvis_core.batch_io import ResultsFile

    _check_images(loaded, prompts)  # before the results file is opened
    results = ResultsFile(output, resume)
    todo = [i for i in range(len(prompts)) if i not in results.done]
    if limit is not None:
        todo = todo[:limit]
    if resume and results.done:
        err_console.print(f"resuming {output}: {len(results.done)} done, {len(todo)} to go", highlight=False)
    ids = _engine_prompts(loaded, [prompts[i] for i in todo])
    generated = 0
    t0 = time.perf_counter()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err_console, disable=not sys.stderr.isatty() and len(todo) < 2)  # fmt: skip
    task = progress.add_task("generating", total=len(todo))

    def on_finish(c) -> None:
        nonlocal generated
        i = todo[c.index]
        image = {"image": prompts[i].image_field} if prompts[i].image is not None else {}
        results.append({"index": i, "prompt": prompts[i].text, **image, "text": c.text,
                        "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason})  # fmt: skip
        generated += len(c.token_ids)
        tok_s = generated / max(time.perf_counter() - t0, 1e-9)
        progress.update(task, advance=1, description=f"generating {tok_s:,.0f} tok/s")

    try:
        with progress:
            # Prompt i samples with seed + i whichever prompts this run skips, so a resumed run matches.
            loaded.engine.generate_many(ids, sampling, max_tokens, batch_size, on_finish=on_finish,
                                        seeds=[sampling.seed + i for i in todo], warn_capped=warn_capped)  # fmt: skip
    finally:
        results.close()
    err_console.print(f"{len(todo)} result(s) written to {output}", highlight=False)


def _first_image(prompts: list):
    """The first batch-file line with an image, or None."""
    return next((p for p in prompts if p.image is not None), None)


def _check_images(loaded, prompts: list) -> None:
    """A batch-file line with an image on a run trained on text only: one message naming the line."""
    from ghostvis_core.image_prompts import require_vision_run

    with_image = _first_image(prompts)
    if with_image is not None:
        require_vision_run(loaded, f"{with_image.where}: image {with_image.image_field!r}")


def _engine_prompts(loaded, prompts: list) -> list:
    """The engine's prompts of batch-file lines: a vision run's through its chat template with each line's image
    (image_prompts.batch_prompt), a text run's as --prompt encodes them."""
    from ghostvis_core.image_prompts import batch_prompt

    if loaded.data_format == "image-chat":
        return [batch_prompt(loaded, p.text, p.image) for p in prompts]
    return [loaded.encode_prompt(p.text) for p in prompts]


def _infer_vllm(path, prompt, prompts, output, resume, sampling, max_tokens, dtype, limit) -> None:
    """--prompt or --batch-file through vLLM (vllm_backend), same output as the native engine's."""
    from ghostvis_core.batch_io import ResultsFile
    from ghostvis_core.vllm_backend import create_vllm_engine

    with create_vllm_engine(path, dtype=dtype) as engine:
        console.print(f"model: {engine.source or engine.folder} (vLLM, serving {engine.folder})", highlight=False,
                      markup=False, soft_wrap=True)
        if prompts is None:
            out = engine.generate_ids([engine.encode(prompt)], sampling, max_tokens)[0]
            console.print(f"[bold]>[/] {prompt}", highlight=False, markup=True)
            console.print(engine.decode(out), highlight=False, markup=False)
            return
        results = ResultsFile(output, resume)
        todo = [i for i in range(len(prompts)) if i not in results.done]
        todo = todo[:limit] if limit is not None else todo
        if resume and results.done:
            err_console.print(f"resuming {output}: {len(results.done)} done, {len(todo)} to go", highlight=False)
        t0 = time.perf_counter()
        try:
            outs = engine.generate_ids([engine.encode(prompts[i].text) for i in todo], sampling, max_tokens,
                                       seeds=[sampling.seed + i for i in todo])
            for i, o in zip(todo, outs, strict=True):
                results.append({"index": i, "prompt": prompts[i].text, "text": engine.decode(o),
                                "num_tokens": len(o["token_ids"]), "finish_reason": o["finish_reason"]})
        finally:
            results.close()
        tokens = sum(len(o["token_ids"]) for o in outs)
        err_console.print(f"{len(todo)} result(s) written to {output} ({tokens / max(time.perf_counter() - t0, 1e-9):,.0f}"
                          " tok/s)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `ghostvis infer`."""
    app.command("infer")(infer)
