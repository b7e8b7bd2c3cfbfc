"""`ghostvis tokenizer train`: train a byte-level BPE tokenizer on a text or chat file and save it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from ghostvis_core.errors import ConfigError, DataError

console = Console(highlight=False)

tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True, add_completion=False)

_KINDS = ("auto", "txt", "jsonl", "parquet", "chat")
_SAMPLE_CHARS = 120


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
    from ghostvis_core.paths import datasets_dir
    from ghostvis_core.tokenizer import Tokenizer

    if kind not in _KINDS:
        raise ConfigError(f"--kind {kind}: expected one of {', '.join(_KINDS)}")
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder; check the path")
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise ConfigError(f"--name {name!r}: a plain folder name (no '/' or '..'); use --out for a path")
    if out is None:
        out = datasets_dir() / "tokenizers" / (name or f"{data.stem}-vocab{vocab_size}")
    elif name is not None:
        raise ConfigError(
            "--name and --out both given: --name only picks the folder name under the default place"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        held = "a tokenizer" if (out / "tokenizer.json").exists() else "other files"
        raise ConfigError(
            f"--out {out} already holds {held}; pass --force to replace it, or pick another --out"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --out names a folder")

    chat = kind == "chat" or (kind == "auto" and _looks_like_chat(data, text_column))
    stats = {"docs": 0, "chats": 0, "chars": 0, "sample": ""}
    texts = _counted(_texts(data, chat, kind, text_column, skip_bad_records, stats), stats)
    tok = Tokenizer.train(texts, vocab_size)
    what = (
        f"{stats['chats']:,} chats ({stats['docs']:,} messages, "
        if chat
        else f"{stats['docs']:,} documents ("
    )
    console.print(f"Read {what}{stats['chars']:,} characters) from {data}", soft_wrap=True)
    note = "" if tok.vocab_size == vocab_size else f" (asked for {vocab_size}: the data supports no more)"
    console.print(f"Vocab size: {tok.vocab_size}{note}")

    sample = stats["sample"]
    ids = tok.encode(sample)
    back = tok.decode(ids)
    console.print(f"Sample: {json.dumps(sample, ensure_ascii=False)}", soft_wrap=True, markup=False)
    console.print(
        f"  -> {len(ids)} tokens: {ids[:16]}{' ...' if len(ids) > 16 else ''}", markup=False, soft_wrap=True
    )
    ok = back == sample
    console.print(f"  -> decode: {'[green]identical[/]' if ok else '[red]DIFFERENT[/]'} round trip")
    if not ok:
        raise DataError(f"tokenizer round trip changed the sample text: {back!r}; not saved")

    try:
        _save_atomically(tok, out)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write the tokenizer there ({e.strerror}); pick another folder") from e
    console.print(f"Saved: {out}", soft_wrap=True, markup=False)
    console.print(f"[dim]Use it with: ghostvis train base_train tokenizer={out}[/]", soft_wrap=True)


def _looks_like_chat(data: Path, text_column: str) -> bool:
    """True when the first record of the first jsonl file has `messages` and no text field."""
    files = sorted(data.glob("*.jsonl")) if data.is_dir() else [data]
    if not files or files[0].suffix not in (".jsonl", ".ndjson"):
        return False
    with files[0].open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False  # iter_documents reports the FILE:LINE error
                return isinstance(obj, dict) and "messages" in obj and text_column not in obj
    return False


def _texts(
    data: Path, chat: bool, kind: str, text_column: str, skip_bad_records: bool, stats: dict
) -> Iterator[str]:
    from ghostvis_core.data import iter_chats, iter_documents

    if not chat:
        yield from iter_documents(data, kind=kind, text_column=text_column, skip_bad_records=skip_bad_records)
        return
    # Chats train on their message texts, not on the rendered template: the role markers are special tokens
    # (never merged), so feeding their strings to BPE would only spend merges on "<|", "user", "_start", ...
    for messages in iter_chats(data, skip_bad_records=skip_bad_records):
        stats["chats"] += 1
        for message in messages:
            yield message["content"]


def _counted(texts: Iterator[str], stats: dict) -> Iterator[str]:
    """Pass texts through while counting them and keeping the first non-blank one (cut) as the sample."""
    for text in texts:
        stats["docs"] += 1
        stats["chars"] += len(text)
        if not stats["sample"] and text.strip():
            stats["sample"] = text[:_SAMPLE_CHARS]
        yield text


def _save_atomically(tok, out: Path) -> None:
    """A new folder appears whole (temp folder renamed into place); an existing one (--force) gets each
    tokenizer file replaced atomically, and its other files are left alone."""
    if out.is_dir() and any(out.iterdir()):
        tok.save(out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok.save(tmp)
        os.replace(tmp, out)  # rename over a missing or empty folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
