"""`ghostvis serve`: an OpenAI-compatible server (and a web chat at /) over a trained run."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import typer
from rich.console import Console

err_console = Console(stderr=True)
API_KEY_ENV = "GHOSTVIS_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: str = typer.Option(None, "--model", help="Run name or folder, a step_NNNNNN checkpoint, or an "
                              "exported HF Llama folder (default: the newest chat run, else the newest base run)."),
    preset: str = typer.Option(None, "--preset", help="Serve a preset's random weights instead (benchmarks; "
                               "token-id prompts only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    backend: str = typer.Option("native", "--backend", help="native | vllm | auto."),
    api_key: str = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_envvar=True,
                                help="Require 'Authorization: Bearer KEY' on every route but /health."),
    dtype: str = typer.Option("auto", "--dtype", help="bfloat16 | float16 | float32 | auto."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="auto (the model's dtype) | fp8 (e4m3 "
                                       "with per-token scales: half the cache bytes; sm89+ GPUs)."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="Model id in the API (default: "
                                          "the run's name)."),
    max_batch_size: int = typer.Option(None, "--max-batch-size", help="Rows decoded together (default: 64 on "
                                       "CUDA, 8 on CPU)."),
    sync_every: int = typer.Option(8, "--sync-every", help="Decode steps between host reads (streaming grain)."),
    max_model_len: int = typer.Option(None, "--max-model-len", help="Cache slots per row, prompt and reply "
                                      "together (default: the model's context)."),
    image_root: Path = typer.Option(None, "--image-root", help="Allow local image paths inside this folder."),
    max_body_bytes: int = typer.Option(16 << 20, "--max-body-bytes", help="Largest request body."),
    max_image_bytes: int = typer.Option(8 << 20, "--max-image-bytes", help="Largest image (encoded)."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", help="Most pixels in one image."),
    max_prompt_tokens: int = typer.Option(None, "--max-prompt-tokens", help="Longest prompt (default: the "
                                          "context less one)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Largest max_tokens a request may ask for."),
    max_concurrent: int = typer.Option(512, "--max-concurrent", help="Requests in flight before 429."),
) -> None:
    """Serve a model over the OpenAI API (chat, completions, streaming, images) with a web chat at /."""
    from ghostvis_core.engine_choice import choose_native_only
    from ghostvis_core.errors import ConfigError
    from ghostvis_core.log import get_logger, setup_logging
    from ghostvis_core.serving import require_serve_extra
    from ghostvis_core.serving.limits import ServeLimits

    require_serve_extra()
    setup_logging()
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (got {port})")
    if model is not None and preset is not None:
        raise ConfigError("pass --model RUN or --preset NAME (random weights), not both")
    limits = ServeLimits(max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes,
                         max_image_pixels=max_image_pixels, max_prompt_tokens=max_prompt_tokens,
                         max_tokens=max_tokens, max_concurrent=max_concurrent, image_root=image_root)  # fmt: skip
    engine = choose_native_only(backend)  # vllm is refused with where it is served
    if backend == "auto":
        get_logger().info(f"--backend auto: using the native engine ({engine.reason})")
    if not api_key and not _is_loopback(host):
        err_console.print(f"[yellow]warning:[/] serving on {host} with no API key: anyone who can reach this "
                          f"address can use the model; pass --api-key KEY (or set {API_KEY_ENV})", highlight=False)
    service = build_service(model, preset, dtype, served_model_name, max_batch_size, sync_every, limits,
                            max_model_len, kv_cache_dtype)
    run_server(service, host, port, api_key or None)


def build_service(model, preset, dtype, name, max_batch_size, sync_every, limits, max_model_len=None,
                  kv_cache_dtype="auto"):
    """The ServedModel of a run (or a preset's random weights)."""
    from ghostvis_core.engine import load_for_inference
    from ghostvis_core.serving.service import ServedModel

    if preset is not None:
        from ghostvis_core.bench.infer_bench import random_model

        loaded = random_model(preset, None, dtype)
    else:
        loaded = load_for_inference(model, dtype=dtype)
    on_cuda = next(loaded.model.parameters()).device.type == "cuda"
    rows = max_batch_size or (64 if on_cuda else 8)
    return ServedModel.from_loaded(loaded, name or (f"random-{preset}" if preset else None), batch_size=rows,
                                   sync_every=sync_every, limits=limits, max_model_len=max_model_len,
                                   kv_cache_dtype=kv_cache_dtype)  # fmt: skip


def run_server(service, host: str, port: int, api_key: str | None) -> None:
    """Run uvicorn with the app until Ctrl-C."""
    import uvicorn

    from ghostvis_core.serving.app import create_app

    app = create_app(service, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    err_console.print(f"serving {service.name} at http://{shown}:{port}/v1 (web chat: http://{shown}:{port}/)",
                      highlight=False, soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("GHOSTVIS_UVICORN_LOG", "warning"),
                access_log=False)


def register(app: typer.Typer) -> None:
    """Add `ghostvis serve`."""
    app.command("serve")(serve)
