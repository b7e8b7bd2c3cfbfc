"""`ghostvis infer`: answer a prompt with a trained run (native KV-cache engine)."""

import typer
from rich.console import Console

console = Console()


def infer(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The question (chat runs) or text to continue."),
    run: str = typer.Option(None, "--run", help="Run name or folder (default: the newest trained run)."),
    checkpoint: str = typer.Option(None, "--checkpoint", help="A step_NNNNNN folder (overrides --run)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(None, "--top-k", help="Sample from the k most likely tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    image: str = typer.Option(None, "--image", help="An image file the prompt asks about (vision runs)."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="bfloat16 | float16 | float32 | auto (bf16 on CUDA, fp32 on CPU)."
    ),
) -> None:
    """Answer one prompt with a trained run's latest checkpoint."""
    from ghostvis_core.engine import generate_text, load_for_inference
    from ghostvis_core.log import setup_logging

    setup_logging()  # the backend banner and the dtype note go to stderr
    loaded = load_for_inference(checkpoint or run, dtype=dtype)
    reply = generate_text(loaded, prompt, max_new_tokens, temperature, top_k, seed, image=image)
    console.print(f"[dim]{loaded.checkpoint} ({loaded.recipe})[/]", highlight=False)
    console.print(f"[bold]>[/] {prompt}", highlight=False)
    console.print(reply, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add `ghostvis infer`."""
    app.command("infer")(infer)
