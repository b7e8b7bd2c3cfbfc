"""Data: sources (txt/jsonl/parquet/chat jsonl), embedded synthetic data, sequence packing, batch loader."""

from ghostvis_core.data.datasets import (
    DEFAULT_NUM_CHATS,
    DEFAULT_NUM_DOCS,
    DEFAULT_VOCAB_SIZE,
    build_chat_dataset,
    build_text_dataset,
    default_tokenizer,
    default_tokenizer_dir,
)
from ghostvis_core.data.loader import PackedBatchLoader
from ghostvis_core.data.packing import IGNORE_INDEX, PackedData, pack_documents
from ghostvis_core.data.sources import SkipReport, iter_chats, iter_documents
from ghostvis_core.data.synthetic import embedded_chats, embedded_corpus

__all__ = [
    "DEFAULT_NUM_CHATS",
    "DEFAULT_NUM_DOCS",
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "PackedBatchLoader",
    "PackedData",
    "SkipReport",
    "build_chat_dataset",
    "build_text_dataset",
    "default_tokenizer",
    "default_tokenizer_dir",
    "embedded_chats",
    "embedded_corpus",
    "iter_chats",
    "iter_documents",
    "pack_documents",
]
