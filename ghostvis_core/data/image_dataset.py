"""Image-chat data -> packed rows that carry their images (vision_pretrain captions, image SFT chats).

Each record is encoded by `Tokenizer.encode_chat` (one `<image>` id per image, loss mask 0), then every
`<image>` id is expanded to P = vision.num_image_tokens consecutive ids, as transformers' LlavaProcessor and
vLLM do, so positions stay consecutive over the image and the VLM replaces exactly those embedding rows.
Rows are packed as text is (packing.py), with the image tokens sticky: a long conversation is split only
between text tokens, never inside an image run nor right after one, so every row holds whole images.

Each row carries its images in the order their runs appear in it (`row_images`), which is the order
`VLM.forward` expects pixel_values in. Images are stored once (a path table; QA data asks several
questions about one image) and each occurrence keeps its record's name, so a decoding error in a loader
worker names the record and the file.

The built-in task (data=None) is the shapes task drawn by code (shapes.py), written once as LLaVA json into
a cache folder keyed on everything that changes its content and read back through the same reader as user
data, so the built-in and a user's LLaVA file take one code path.

Shape legend: N rows, T = seq_len, M image occurrences, P tokens per image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghostvis_core.atomic import atomic_dir
from ghostvis_core.data.images import iter_image_chats
from ghostvis_core.data.packing import PackedData, UnsplittableDocumentError, pack_with_layout
from ghostvis_core.data.shapes import SHAPES_VERSION, write_llava_dataset
from ghostvis_core.data.sources import SkipReport
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.log import get_logger
from ghostvis_core.paths import cache_dir
from ghostvis_core.tokenizer import Tokenizer
from ghostvis_core.vision_config import VisionConfig

BUILTIN_TASKS = {"shapes-caption": "caption", "shapes-qa": "qa"}
"""Built-in image tasks: captions (for vision_pretrain) and questions with short answers (for image SFT)."""
DEFAULT_BUILTIN_COUNT = 3000
"""Images drawn for the built-in task when builtin_count is None (QA gives 2-4 records per image)."""
BUILTIN_SEED = 0
"""Seed of the built-in task; the held-out split depends on the scene, not the seed (shapes.py)."""


@dataclass(frozen=True)
class ImageTable:
    """Which images each packed row holds, in order; small enough to send to every loader worker."""

    paths: tuple[Path, ...]
    """Distinct image files; occurrences refer to them by index."""
    record_names: tuple[str, ...]
    """'FILE:record N' / 'FILE:LINE' of every record, for errors raised while decoding."""
    path_ids: np.ndarray
    """(M,) index into `paths` of each image occurrence, rows laid end to end in row order."""
    record_ids: np.ndarray
    """(M,) index into `record_names` of each occurrence."""
    row_offsets: np.ndarray
    """(N + 1,) occurrences of row r are [row_offsets[r], row_offsets[r + 1])."""

    def row_sources(self, row: int) -> list[tuple[str, Path]]:
        """(record name, path) of each image of `row`, in the order its image runs appear."""
        lo, hi = int(self.row_offsets[row]), int(self.row_offsets[row + 1])
        return [(self.record_names[r], self.paths[p])
                for r, p in zip(self.record_ids[lo:hi].tolist(), self.path_ids[lo:hi].tolist(), strict=True)]

    def num_images_per_row(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) int64 images in each of `rows`."""
        return (self.row_offsets[rows + 1] - self.row_offsets[rows]).astype(np.int64)


def _empty_table() -> ImageTable:
    empty = np.zeros(0, dtype=np.int64)
    return ImageTable((), (), empty, empty, np.zeros(1, dtype=np.int64))


@dataclass
class PackedImageData(PackedData):
    """Packed rows (everything PackedData has) plus the images each row carries, in order."""

    images: ImageTable = field(default_factory=_empty_table)
    """The rows' images; `row_images(r)` gives row r's files."""
    image_token_id: int = -1
    """The `<image>` id; each image is num_image_tokens consecutive copies of it."""
    num_image_tokens: int = 0
    """P: tokens per image (vision.num_image_tokens)."""

    @property
    def num_images(self) -> int:
        """Image occurrences over all rows (an image asked about twice counts twice)."""
        return len(self.images.path_ids)

    def row_images(self, row: int) -> list[Path]:
        """The image files of `row`, in the order their token runs appear in it."""
        return [path for _, path in self.images.row_sources(row)]

    def stats_line(self) -> str:
        """The packing line plus the image count."""
        return f"{super().stats_line()}, {self.num_images} images of {self.num_image_tokens} tokens"


def builtin_dataset_dir(builtin: str, count: int, image_size: int, split: str) -> Path:
    """Cache folder of one materialised built-in task: keyed on everything its content depends on."""
    kind = _builtin_kind(builtin)
    name = f"shapes-v{SHAPES_VERSION}-{kind}-n{count}-px{image_size}-seed{BUILTIN_SEED}-{split}"
    return cache_dir() / "datasets" / name


def _builtin_kind(builtin: str) -> str:
    if builtin not in BUILTIN_TASKS:
        raise ConfigError(f"builtin={builtin!r}: use one of {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[builtin]


def materialise_builtin(builtin: str, count: int, image_size: int, split: str = "train") -> Path:
    """The data.json of the built-in task, drawn into the cache on first use and reused afterwards."""
    kind = _builtin_kind(builtin)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"builtin_count={count!r} must be a positive integer (images to draw)")
    final = builtin_dataset_dir(builtin, count, image_size, split)
    data = final / "shapes" / "data.json"
    if data.is_file():  # published whole by the rename below, so present means complete
        return data
    # Several ranks may draw at once: the first rename wins and the others' identical copies are dropped,
    # so a rank already reading the folder is never disturbed.
    try:
        with atomic_dir(final, keep_existing=True) as tmp:
            write_llava_dataset(tmp / "shapes", count, kind, image_size=image_size, seed=BUILTIN_SEED, split=split)
        problem = None if data.is_file() else "the folder exists without shapes/data.json"
    except OSError as e:
        problem = e.strerror
    if problem is not None:
        raise DataError(f"cannot cache the built-in {builtin} data at {final} ({problem}); if that folder is "
                        "left from an interrupted run, delete it and run again")
    get_logger().info("Drew the built-in %s task (%s, %d images, %d px) -> %s", builtin, split, count,
                      image_size, final)
    return data


def expand_image_tokens(ids: list[int], mask: list[int], image_id: int, P: int) -> tuple[np.ndarray, ...]:
    """(ids, mask, image starts) with every `<image>` id repeated P times (P = the tower's tokens per image, as
    HF's LlavaProcessor and vLLM expand it); image starts index the new ids. Training data and inference
    prompts both expand through here."""
    ids_a = np.asarray(ids, dtype=np.int64)
    is_image = ids_a == image_id
    repeats = np.where(is_image, P, 1)
    at = np.flatnonzero(is_image)
    # The j-th image moves right by the j * (P - 1) ids the earlier images gained.
    starts = at + np.arange(len(at), dtype=np.int64) * (P - 1)
    return np.repeat(ids_a, repeats), np.repeat(np.asarray(mask, dtype=np.int64), repeats), starts


def build_image_chat_dataset(
    data: str | os.PathLike | None,
    tokenizer: Tokenizer,
    row_len: int,
    vision: VisionConfig,
    *,
    image_root: str | os.PathLike | None = None,
    skip_bad_records: bool = False,
    builtin: str = "shapes-qa",
    builtin_count: int | None = None,
    split: str = "train",
) -> PackedImageData:
    """Packed image-chat rows from LLaVA json / jsonl / chat jsonl (None = the built-in shapes task).

    row_len: tokens per row the model sees (pack_max_length, the model's sequence_len); rows hold one more,
    the last target. builtin / builtin_count / split choose the built-in task and are used only when data is
    None. Loss is on assistant tokens only; text-only records (LLaVA mixes hold some) are kept.
    """
    if data is None:
        count = DEFAULT_BUILTIN_COUNT if builtin_count is None else builtin_count
        path = materialise_builtin(builtin, count, vision.image_size, split)
        source, image_root = f"the built-in {builtin} task ({split}, {count} images)", None
    else:
        path, source = Path(data), str(data)
    report = SkipReport()
    chats = list(iter_image_chats(path, image_root, require_image=False, skip_bad_records=skip_bad_records,
                                  report=report))
    P, image_id = vision.num_image_tokens, tokenizer.image_id
    docs, masks, sticky = [], [], []
    image_flat, image_path, image_record = [], [], []  # per occurrence, in token order
    path_index: dict[Path, int] = {}
    offset = 0
    for r, chat in enumerate(chats):
        ids, mask = tokenizer.encode_chat(chat.template_messages())
        ids_a, mask_a, starts = expand_image_tokens(ids, mask, image_id, P)
        assert len(starts) == len(chat.image_paths), "encode_chat emits one <image> per image part"
        docs.append(ids_a)
        masks.append(mask_a)
        sticky.append(ids_a == image_id)
        image_flat.append(offset + starts)
        image_path.extend(path_index.setdefault(p, len(path_index)) for p in chat.image_paths)
        image_record.extend([r] * len(starts))
        offset += len(ids_a)
    names = tuple(chat.where for chat in chats)
    try:
        packed, layout = pack_with_layout(docs, masks, row_len, tokenizer.bos_id, tokenizer.pad_id, sticky=sticky)
    except UnsplittableDocumentError as e:
        raise DataError(
            f"{names[e.doc]}: {e.reason}; each image is {P} tokens ({vision.image_size} px, patch "
            f"{vision.patch_size}): raise pack_max_length (now {row_len}) or lower the image size"
        ) from e
    flat_starts = np.concatenate(image_flat) if image_flat else np.zeros(0, dtype=np.int64)
    # Pieces never cut an image, so an image belongs to the piece its first token falls in.
    lo = np.searchsorted(flat_starts, layout.src)
    hi = np.searchsorted(flat_starts, layout.src + layout.content_len)
    order = [np.arange(lo[p], hi[p]) for row in layout.row_pieces for p in row]
    per_row = [sum(int(hi[p] - lo[p]) for p in row) for row in layout.row_pieces]
    occ = np.concatenate(order).astype(np.int64) if order else np.zeros(0, dtype=np.int64)
    table = ImageTable(
        paths=tuple(path_index),
        record_names=names,
        path_ids=np.asarray(image_path, dtype=np.int64)[occ],
        record_ids=np.asarray(image_record, dtype=np.int64)[occ],
        row_offsets=np.concatenate([[0], np.cumsum(per_row, dtype=np.int64)]).astype(np.int64),
    )
    tokens_per_row = (packed.input_ids == image_id).sum(axis=1)
    assert (tokens_per_row == np.diff(table.row_offsets) * P).all(), "every image run lies whole in the inputs"
    out = PackedImageData(**vars(packed), images=table, image_token_id=image_id, num_image_tokens=P)
    log = get_logger()
    log.info("Data: %d image chats, %d images, %d tokens (%d with loss) from %s", len(chats),
             out.num_images, out.num_real_tokens, out.num_target_tokens, source)
    if report.num_skipped:
        log.info("Data: skipped %d malformed records (first: %s)", report.num_skipped, report.first_error)
    log.info(out.stats_line())
    if out.num_images == 0:
        raise DataError(f"{source}: no images in any record; a vision recipe needs image-chat data")
    if out.num_target_tokens == 0:
        raise DataError(f"{source}: no assistant tokens left to learn from after packing")
    return out
