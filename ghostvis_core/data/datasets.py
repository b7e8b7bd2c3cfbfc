"""High-level builders for the trainer: file or embedded data -> tokens -> PackedData; the default tokenizer."""

from __future__ import annotations

import os
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from ghostvis_core.atomic import atomic_dir
from ghostvis_core.data.packing import PackedData, pack_documents
from ghostvis_core.data.sources import data_files, iter_chats, iter_documents
from ghostvis_core.data.synthetic import SYNTHETIC_VERSION, embedded_chats, embedded_corpus
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.log import get_logger
from ghostvis_core.paths import datasets_dir
from ghostvis_core.tokenizer import Tokenizer

DEFAULT_NUM_DOCS = 4000
"""Embedded corpus size when no path is given (a tiny model sees it many times in a CPU minute)."""
DEFAULT_NUM_CHATS = 4000
"""Embedded chats when no path is given."""
DEFAULT_VOCAB_SIZE = 2048
"""Asked-for vocabulary of the default tokenizer; the embedded corpus supports fewer merges (see log)."""
_ENCODE_CHUNK = 8192  # texts per encode_batch call: bounds the memory held in Encoding objects


def _check_max_docs(max_docs: int | None) -> None:
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise ConfigError(f"max_docs={max_docs!r} must be a positive integer or None (all)")


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for i in range(0, len(texts), _ENCODE_CHUNK):
        ids.extend(tokenizer.encode_batch(texts[i:i + _ENCODE_CHUNK]))
    return ids


def build_text_dataset(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    kind: str = "auto",
    text_column: str = "text",
    skip_bad_records: bool = False,
    max_docs: int | None = None,
) -> PackedData:
    """Pretraining rows from a txt/jsonl/parquet file or folder (None = embedded corpus), every token learned."""
    _check_max_docs(max_docs)
    if path is None:
        texts = embedded_corpus(max_docs or DEFAULT_NUM_DOCS, seed=0)
        source = "embedded synthetic corpus"
    else:
        texts = list(islice(iter_documents(path, kind, text_column, skip_bad_records), max_docs))
        source = str(path)
        if any(k == "txt" for _, k in data_files(path, kind)):
            source += " (.txt: one document per paragraph, split at blank lines)"
    docs = _encode_texts(tokenizer, texts)
    packed = pack_documents(docs, None, seq_len, tokenizer.bos_id, tokenizer.pad_id)
    log = get_logger()
    log.info("Data: %d documents, %d tokens from %s", len(docs), packed.num_real_tokens, source)
    log.info(packed.stats_line())
    return packed


def build_chat_dataset(
    path: str | os.PathLike | None,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    skip_bad_records: bool = False,
    max_docs: int | None = None,
) -> PackedData:
    """SFT rows from a chat jsonl file or folder (None = embedded chats); loss on assistant tokens only."""
    _check_max_docs(max_docs)
    if path is None:
        chats = embedded_chats(max_docs or DEFAULT_NUM_CHATS, seed=0)
        source = "embedded synthetic chats"
    else:
        chats = list(islice(iter_chats(path, skip_bad_records), max_docs))
        source = str(path)
    docs, masks = [], []
    for messages in chats:
        ids, mask = tokenizer.encode_chat(messages)
        docs.append(ids)
        masks.append(mask)
    packed = pack_documents(docs, masks, seq_len, tokenizer.bos_id, tokenizer.pad_id)
    log = get_logger()
    log.info("Data: %d chats, %d tokens (%d with loss) from %s",
             len(docs), packed.num_real_tokens, packed.num_target_tokens, source)
    log.info(packed.stats_line())
    if packed.num_target_tokens == 0:
        raise DataError(f"{source}: no assistant tokens left to learn from after packing")
    return packed


def embedded_training_texts() -> list[str]:
    """What the default tokenizer is trained on: the embedded corpus plus every chat message's content."""
    texts = embedded_corpus(DEFAULT_NUM_DOCS, seed=0)
    texts += [m["content"] for chat in embedded_chats(DEFAULT_NUM_CHATS, seed=0) for m in chat]
    return texts


def default_tokenizer_dir(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Cache folder of the default tokenizer for `vocab_size` under datasets_dir()."""
    return datasets_dir() / "tokenizers" / f"embedded-v{SYNTHETIC_VERSION}-vocab{vocab_size}"


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The tokenizer trained on the embedded data; trained once (deterministically), then loaded from cache."""
    final = default_tokenizer_dir(vocab_size)
    tok, trained = cached_tokenizer(final, lambda: Tokenizer.train(embedded_training_texts(), vocab_size),
                                    "the default tokenizer")
    if trained:
        get_logger().info("Trained the default tokenizer (%d tokens) -> %s", tok.vocab_size, final)
    return tok


def cached_tokenizer(final: Path, train: Callable[[], Tokenizer], what: str) -> tuple[Tokenizer, bool]:
    """(tokenizer, trained now): the one cached in `final`, else `train()`'s, saved there. Training must be
    deterministic: ranks that race each train, the first rename wins and the others (identical) are dropped."""
    if (final / "tokenizer.json").is_file():
        return Tokenizer.load(final), False
    tok = train()
    # Save into a private temp folder, then rename it into place: readers never see a half-written folder.
    try:
        with atomic_dir(final, keep_existing=True) as tmp:
            tok.save(tmp)
        problem = None if (final / "tokenizer.json").is_file() else "the folder exists without tokenizer.json"
    except OSError as e:
        problem = e.strerror
    if problem is not None:
        raise DataError(f"cannot cache {what} at {final} ({problem}); if that folder is left from an "
                        "interrupted run, delete it and run again")
    return tok, True
