"""`ghostvis tokenizer train`: train a byte-level BPE tokenizer on a text or chat file and save it.

The data rules (which records count, what BPE sees, where and how it is saved) live in
ghostvis_core.tokenizer_training; this module reads flags and prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

console = Console(highlight=False)

tokenizer_app = typer.Typer(help="Train byte-level BPE tokenizers on your data.", no_args_is_help=True, add_completion=False)


def register(app: typer.Typer) -> None:
    """Add `ghostvis tokenizer ...` to the app."""
    app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def train_tokenizer(
    data: Path = typer.Option(..., "--data", help="txt/jsonl/parquet file or folder, or a chat jsonl file."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary size, special tokens included."),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: DATASETS_DIR/tokenizers/NAME)."
    ),
    name: str | None = typer.Option(None, "--name", help="Folder name under the default location."),
    kind: str = typer.Option("auto", "--kind", help="auto | txt | jsonl | parquet | chat."),
    text_column: str = typer.Option("text", "--text-column", help="Text field of jsonl/parquet records."),
    skip_bad_records: bool = typer.Option(
        False, "--skip-bad-records", help="Skip malformed records (counted) instead of stopping at the first."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer in the output folder."),
) -> None:
    """Train a byte-level BPE tokenizer on documents (chats: their message texts) and save it."""
    from ghostvis_core import tokenizer_training
    from ghostvis_core.paths import datasets_dir

    out = tokenizer_training.output_dir(
        data, vocab_size, out, name, kind, force, default_root=datasets_dir() / "tokenizers"
    )
    trained = tokenizer_training.train_from_data(data, vocab_size, kind, text_column, skip_bad_records)
    tok, stats = trained.tokenizer, trained.stats
    if trained.chat:
        what = f"{stats.chats:,} chats ({stats.docs:,} messages, "
    else:
        what = f"{stats.docs:,} documents ("
    console.print(f"Read {what}{stats.chars:,} characters) from {data}", soft_wrap=True)
    note = "" if tok.vocab_size == vocab_size else f" (asked for {vocab_size}: the data supports no more)"
    console.print(f"Vocab size: {tok.vocab_size}{note}")

    ids = tok.encode(stats.sample)
    back = tok.decode(ids)
    console.print(f"Sample: {json.dumps(stats.sample, ensure_ascii=False)}", soft_wrap=True, markup=False)
    console.print(
        f"  -> {len(ids)} tokens: {ids[:16]}{' ...' if len(ids) > 16 else ''}", markup=False, soft_wrap=True
    )
    ok = back == stats.sample
    console.print(f"  -> decode: {'[green]identical[/]' if ok else '[red]DIFFERENT[/]'} round trip")
    tokenizer_training.check_round_trip(stats.sample, back)

    tokenizer_training.save(tok, out)
    console.print(f"Saved: {out}", soft_wrap=True, markup=False)
    console.print(f"[dim]Use it with: ghostvis train base_train tokenizer={out}[/]", soft_wrap=True)
