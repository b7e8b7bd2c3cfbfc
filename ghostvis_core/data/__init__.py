"""Data: sources (txt/jsonl/parquet/chat jsonl, image chats), embedded and built-in data, packing, batch loaders."""

from ghostvis_core.data.datasets import (
    DEFAULT_NUM_CHATS,
    DEFAULT_NUM_DOCS,
    DEFAULT_VOCAB_SIZE,
    build_chat_dataset,
    build_text_dataset,
    default_tokenizer,
    default_tokenizer_dir,
)
from ghostvis_core.data.image_dataset import (
    BUILTIN_TASKS,
    DEFAULT_BUILTIN_COUNT,
    ImageTable,
    PackedImageData,
    build_image_chat_dataset,
    builtin_dataset_dir,
    materialise_builtin,
)
from ghostvis_core.data.image_loader import ImageBatchLoader
from ghostvis_core.data.loader import PackedBatchLoader
from ghostvis_core.data.packing import IGNORE_INDEX, PackedData, pack_documents
from ghostvis_core.data.sources import SkipReport, iter_chats, iter_documents
from ghostvis_core.data.synthetic import embedded_chats, embedded_corpus

__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_BUILTIN_COUNT",
    "DEFAULT_NUM_CHATS",
    "DEFAULT_NUM_DOCS",
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "ImageBatchLoader",
    "ImageTable",
    "PackedBatchLoader",
    "PackedData",
    "PackedImageData",
    "SkipReport",
    "build_chat_dataset",
    "build_image_chat_dataset",
    "build_text_dataset",
    "builtin_dataset_dir",
    "default_tokenizer",
    "default_tokenizer_dir",
    "embedded_chats",
    "embedded_corpus",
    "iter_chats",
    "iter_documents",
    "materialise_builtin",
    "pack_documents",
]
