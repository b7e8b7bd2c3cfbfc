"""`ghostvis export RUN_OR_CHECKPOINT OUT_DIR`: a Hugging Face folder transformers and vLLM load as they are."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text


def export(
    model: str = typer.Argument(..., help="A run name or folder (its latest checkpoint) or a step_NNNNNN folder."),
    out_dir: str = typer.Argument(..., help="The folder to write (must not exist, or be empty)."),
    force: bool = typer.Option(False, "--force", "--overwrite", help="Replace an existing OUT_DIR whole."),
) -> None:
    """Export a checkpoint: text runs as LlamaForCausalLM, vision runs as LlavaForConditionalGeneration."""
    from ghostvis_core.checkpoint import resolve_checkpoint_spec
    from ghostvis_core.errors import ConfigError
    from ghostvis_core.export_checkpoint import export_checkpoint, is_hf_folder
    from ghostvis_core.paths import runs_dir

    out = Path(out_dir).expanduser()
    if is_hf_folder(Path(model).expanduser()):
        raise ConfigError(f"{model} is already a Hugging Face folder (config.json, no state.json): load it as it "
                          "is, or give a run or a step_NNNNNN checkpoint to export")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out} is a file: choose a folder path")
    non_empty = out.is_dir() and any(out.iterdir())
    if non_empty and not force:
        raise ConfigError(f"OUT_DIR {out} already exists and is not empty: choose a new folder, or pass --force "
                          "to replace it")
    step_dir = resolve_checkpoint_spec(model, runs_dir(), "export")
    # written beside OUT_DIR and renamed into place: an existing folder is replaced whole or not at all
    folder = export_checkpoint(step_dir, out, overwrite=out.is_dir())
    _report(step_dir, folder, Console(highlight=False))


def _report(step_dir: Path, folder: Path, console: Console) -> None:
    import json

    config = json.loads((folder / "config.json").read_text("utf-8"))
    arch = config["architectures"][0]
    files = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    auto = "AutoModelForImageTextToText" if arch.startswith("Llava") else "AutoModelForCausalLM"
    lines = [
        f"exported {step_dir} as {arch} to {folder} ({size:.1f} MiB)",
        f"files: {', '.join(files)}",
        "load it with transformers:",
        f"  from transformers import AutoTokenizer, {auto}",
        f"  model = {auto}.from_pretrained({str(folder)!r}); tok = AutoTokenizer.from_pretrained({str(folder)!r})",
        "serve it with vLLM (prompts as token ids or llm.chat(): a rendered string would get two BOS):",
        f"  from vllm import LLM; llm = LLM({str(folder)!r}); llm.chat([{{'role': 'user', 'content': 'hi'}}])",
        f"  or: ghostvis infer --backend vllm --model {folder} --prompt 'hi'",
    ]
    console.print(Text("\n".join(lines)), soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `ghostvis export`."""
    app.command("export")(export)
