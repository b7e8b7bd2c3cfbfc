"""A small stand-in for the image data pipeline (build_image_chat_dataset / ImageBatchLoader) in tests of the
trainer's VLM side: shapes-task samples, one chat per row, pixels in memory, PackedBatchLoader's row order and
state_dict. The real pipeline lives in ghostvis_core.data; tests patch setup.build_image_data with this."""

from __future__ import annotations

import numpy as np
import torch

from ghostvis_core.constants import IGNORE_INDEX
from ghostvis_core.data.image_dataset import expand_image_tokens
from ghostvis_core.data.images import _to_pixels
from ghostvis_core.data.loader import PackedBatchLoader
from ghostvis_core.data.packing import PackedData
from ghostvis_core.data.shapes import CAPTION_PROMPT, ShapesTask


def shapes_chats(builtin: str, count: int, seed: int = 0, split: str = "train"):
    """[(user prompt, answer, PIL image)] of the built-in shapes task."""
    task = ShapesTask(32, seed, split)
    out = []
    for i in range(count):
        sample = task.sample(i)
        if builtin == "shapes-caption":
            out.append((CAPTION_PROMPT, sample.caption, sample.image))
        else:
            out.extend((q, a, sample.image) for q, a, _ in sample.qa)
    return out


def build_stand_in(tokenizer, row_len: int, vision, builtin: str, count: int = 48):
    """(PackedData with a .pixels (N, C, H, W) array, one image per row)."""
    rows, pixels = [], []
    for prompt, answer, image in shapes_chats(builtin, count):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + prompt}]},
                    {"role": "assistant", "content": answer}]
        ids, mask = tokenizer.encode_chat(messages)
        ids, mask, _ = (a.tolist() for a in expand_image_tokens(ids, mask, tokenizer.image_id, vision.num_image_tokens))
        ids, mask = ids[:row_len + 1], mask[:row_len + 1]
        pad = row_len + 1 - len(ids)
        ids, mask = ids + [tokenizer.pad_id] * pad, mask + [0] * pad
        targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        rows.append((ids[:-1], targets))
        pixels.append(_to_pixels(image, vision.image_size, vision.image_mean, vision.image_std).numpy())
    n = len(rows)
    packed = PackedData(
        input_ids=np.array([r[0] for r in rows], dtype=np.int64),
        targets=np.array([r[1] for r in rows], dtype=np.int64),
        position_ids=np.tile(np.arange(row_len, dtype=np.int64), (n, 1)),
        seq_len=row_len, num_docs=n,
    )
    packed.pixels = np.stack(pixels)
    return packed


class StandInLoader(PackedBatchLoader):
    """PackedBatchLoader plus "pixel_values" (one image per row, rows in order) and wait_seconds."""

    wait_seconds = 0.0

    def _take_global_rows(self):
        rows = super()._take_global_rows()
        self._rows = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # this rank's, in order
        return rows

    def __next__(self):
        batch = super().__next__()
        batch["pixel_values"] = torch.from_numpy(self.packed.pixels[self._rows])
        return batch


def stand_in_build_image_data(cfg, tokenizer, spec, info, vision):
    """setup.build_image_data's signature over the stand-in."""
    packed = build_stand_in(tokenizer, cfg.pack_max_length, vision, spec.image_builtin)
    return packed, StandInLoader(packed, cfg.device_batch_size, rank=info.rank, world_size=info.world_size,
                                 seed=cfg.seed)
