"""Training a tokenizer from data: which files and records count, what text BPE sees, how it is saved.

`ghostvis tokenizer train` parses flags and prints; the rules live here so they are testable without the CLI.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ghostvis_core.atomic import atomic_dir
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.tokenizer import Tokenizer

KINDS = ("auto", "txt", "jsonl", "parquet", "chat")
SAMPLE_CHARS = 120
DATA_TOKENIZER_VERSION = 1
"""Part of the cache key of tokenizers trained for --data: bump when what they are trained on changes."""
_HASH_CHUNK = 1 << 20


@dataclass
class TrainingStats:
    """What a training pass read: documents (chat messages), chats, characters, and a sample text."""

    docs: int = 0
    """Texts fed to BPE (for chats: messages)."""
    chats: int = 0
    """Chats read (0 for plain documents)."""
    chars: int = 0
    """Characters fed to BPE."""
    sample: str = ""
    """The first non-blank text, cut to SAMPLE_CHARS: the round-trip check."""


@dataclass
class TrainedTokenizer:
    """A trained tokenizer and what it was trained on."""

    tokenizer: Tokenizer
    stats: TrainingStats
    chat: bool
    """True when the data was read as chats."""


def output_dir(
    data: Path,
    vocab_size: int,
    out: Path | None,
    name: str | None,
    kind: str,
    force: bool,
    default_root: Path,
) -> Path:
    """Check the flags against the data and the output folder; the folder to save into (--out or default)."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if not data.exists():
        raise DataError(f"--data {data}: no such file or folder; check the path")
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise ConfigError(f"--name {name!r}: a plain folder name (no '/' or '..'); use --out for a path")
    if out is None:
        out = default_root / (name or f"{data.stem}-vocab{vocab_size}")
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
    return out


def train_from_data(
    data: Path, vocab_size: int, kind: str, text_column: str, skip_bad_records: bool, chat: bool | None = None
) -> TrainedTokenizer:
    """Train BPE on the documents of `data` (chats: their message texts), counting what was read; `chat` None
    reads chats when kind is chat, or auto and the data looks like chats."""
    if chat is None:
        chat = kind == "chat" or (kind == "auto" and looks_like_chat(data, text_column))
    stats = TrainingStats()
    texts = _counted(_texts(data, chat, kind, text_column, skip_bad_records, stats), stats)
    return TrainedTokenizer(Tokenizer.train(texts, vocab_size), stats, chat)


def looks_like_chat(data: Path, text_column: str) -> bool:
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


def check_round_trip(sample: str, decoded: str) -> None:
    """A tokenizer that changes the sample text when encoding then decoding it is not saved."""
    if decoded != sample:
        raise DataError(f"tokenizer round trip changed the sample text: {decoded!r}; not saved")


def save(tok: Tokenizer, out: Path) -> None:
    """Save to `out`; an unwritable folder is a ConfigError naming --out."""
    try:
        _save_atomically(tok, out)
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot write the tokenizer there ({e.strerror}); pick another folder"
        ) from e


def _texts(
    data: Path, chat: bool, kind: str, text_column: str, skip_bad_records: bool, stats: TrainingStats
) -> Iterator[str]:
    from ghostvis_core.data import iter_chats, iter_documents

    if not chat:
        yield from iter_documents(data, kind=kind, text_column=text_column, skip_bad_records=skip_bad_records)
        return
    # Chats train on their message texts, not on the rendered template: the role markers are special tokens
    # (never merged), so feeding their strings to BPE would only spend merges on "<|", "user", "_start", ...
    for messages in iter_chats(data, skip_bad_records=skip_bad_records):
        stats.chats += 1
        for message in messages:
            yield message["content"]


def _counted(texts: Iterator[str], stats: TrainingStats) -> Iterator[str]:
    """Pass texts through while counting them and keeping the first non-blank one (cut) as the sample."""
    for text in texts:
        stats.docs += 1
        stats.chars += len(text)
        if not stats.sample and text.strip():
            stats.sample = text[:SAMPLE_CHARS]
        yield text


def _save_atomically(tok: Tokenizer, out: Path) -> None:
    """A new folder appears whole (temp folder renamed into place); an existing one (--force) gets each
    tokenizer file replaced atomically, and its other files are left alone."""
    if out.is_dir() and any(out.iterdir()):
        tok.save(out)
        return
    with atomic_dir(out) as tmp:
        tok.save(tmp)


def data_fingerprint(data: Path, vocab_size: int, kind: str, text_column: str) -> str:
    """16 hex digits of SHA-256 over every file the run reads from `data` (its bytes, and in a folder its name,
    which fixes the reading order) and the settings that change the tokenizer: the same corpus, wherever it lies
    and whatever a single file is called, gives the same key."""
    from ghostvis_core.data.sources import data_files

    digest = hashlib.sha256(json.dumps({"version": DATA_TOKENIZER_VERSION, "vocab_size": vocab_size, "kind": kind,
                                        "text_column": text_column}).encode())
    for path, file_kind in data_files(data, kind):
        digest.update(f"\0{path.name if Path(data).is_dir() else ''}\0{file_kind}\0".encode())
        with path.open("rb") as f:
            while block := f.read(_HASH_CHUNK):
                digest.update(block)
    return digest.hexdigest()[:16]


def data_tokenizer(data: Path, vocab_size: int, *, kind: str, text_column: str, skip_bad_records: bool,
                   cache_root: Path) -> Tokenizer:
    """The tokenizer for a pretraining run on `data` without tokenizer=: trained on that data's documents once,
    cached under `cache_root` by their content hash (data_fingerprint), reused while the content is unchanged.
    (Chat and image runs start from a base model and take its tokenizer.)"""
    from ghostvis_core.data.datasets import cached_tokenizer
    from ghostvis_core.log import get_logger

    key = data_fingerprint(data, vocab_size, kind, text_column)
    final = cache_root / f"data-{key}-vocab{vocab_size}"
    trained: list[TrainedTokenizer] = []

    def train() -> Tokenizer:
        # documents, as the run reads them (a chat-looking file is not read as chats here)
        trained.append(train_from_data(data, vocab_size, kind, text_column, skip_bad_records, chat=False))
        tok = trained[0].tokenizer
        check_round_trip(trained[0].stats.sample, tok.decode(tok.encode(trained[0].stats.sample)))
        return tok

    tok, fresh = cached_tokenizer(final, train, f"the tokenizer trained on {data}")
    how = "tokenizer=PATH uses another; `ghostvis tokenizer train` makes one with other settings"
    if fresh:
        stats = trained[0].stats
        get_logger().info(f"Tokenizer: trained on --data {data} ({stats.docs} documents, {stats.chars:,} characters): "
                          f"{tok.vocab_size} tokens -> {final}; reused while the data is unchanged ({how})")
    else:
        get_logger().info(f"Tokenizer: reusing the one trained on this data (content hash {key}, "
                          f"{tok.vocab_size} tokens): {final} ({how})")
    return tok
