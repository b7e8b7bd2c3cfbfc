"""Image-chat dataset: <image> expansion to the tower's token count, rows carrying their images in order,
packing that never cuts an image, the refusal when it must, and the cached built-in shapes task."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ghostvis_core.data import (
    IGNORE_INDEX,
    PackedImageData,
    build_image_chat_dataset,
    builtin_dataset_dir,
    image_dataset,
)
from ghostvis_core.data.packing import UnsplittableDocumentError, pack_with_layout
from ghostvis_core.errors import DataError
from ghostvis_core.tokenizer import Tokenizer
from ghostvis_core.vision_config import get_vision_config

VISION = get_vision_config("tiny")  # 32 px, patch 8
P = 16  # tokens per image of the tiny tower
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (120, 60, 10), (250, 250, 250)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["a red circle at top left and a small blue square at bottom right", "what colour is it",
             "describe the image", "one two three green yellow triangle large"] * 10
    return Tokenizer.train(texts, 300)


def write_images(folder, n: int) -> list[str]:
    """n distinct solid-colour PNGs img0.png ... (distinct so a mix-up of order shows in the pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 14), COLOURS[i % len(COLOURS)]).save(folder / f"img{i}.png")
    return [f"img{i}.png" for i in range(n)]


def llava(images: list[str], question: str, answer: str) -> dict:
    return {"image": images, "conversations": [{"from": "human", "value": question},
                                               {"from": "gpt", "value": answer}]}


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def image_runs(ids_T: np.ndarray, image_id: int) -> list[tuple[int, int]]:
    """[(start, length)] of every maximal run of image ids in a row."""
    is_image = np.concatenate([[False], ids_T == image_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


# ---------------------------------------------------------------------------------------------------------
# Expansion and several images per sample


def test_each_image_becomes_num_image_tokens_ids_with_no_loss(tmp_path, tok):
    names = write_images(tmp_path, 3)
    f = write_json(tmp_path / "data.json", [
        llava(names[:1], "<image>\nwhat colour is it", "red"),
        llava(names, "<image> <image> and <image>: describe the image", "three"),
    ])
    data = build_image_chat_dataset(f, tok, 256, VISION)
    assert isinstance(data, PackedImageData) and data.num_images == 4 and data.num_image_tokens == P
    runs = [run for r in range(data.num_rows) for run in image_runs(data.input_ids[r], tok.image_id)]
    assert [length for _, length in runs] == [P] * 4  # separated by text, so each run is one image
    is_image = data.input_ids == tok.image_id
    assert int(is_image.sum()) == 4 * P
    # Loss mask 0: no target at an image position and no target names the image token.
    assert (data.targets[is_image] == IGNORE_INDEX).all()
    assert not (data.targets == tok.image_id).any()
    # Consecutive positions over each image, as LlavaProcessor gives.
    for r in range(data.num_rows):
        for s, length in image_runs(data.input_ids[r], tok.image_id):
            pos = data.position_ids[r, s:s + length]
            assert (np.diff(pos) == 1).all()


def test_several_images_per_sample_keep_their_order(tmp_path, tok):
    names = write_images(tmp_path / "imgs", 3)
    order = [names[2], names[0], names[1]]
    f = write_json(tmp_path / "data.json", [llava(order, "<image> then <image> then <image>", "yes")])
    data = build_image_chat_dataset(f, tok, 256, VISION, image_root=tmp_path / "imgs")
    assert data.num_rows == 1
    assert [p.name for p in data.row_images(0)] == order
    assert len(image_runs(data.input_ids[0], tok.image_id)) == 3
    assert "3 images of 16 tokens" in data.stats_line()


# ---------------------------------------------------------------------------------------------------------
# Packing never cuts an image


def test_long_document_is_split_only_between_images(tmp_path, tok):
    n = 8
    names = write_images(tmp_path, n + 3)
    long_images, short_images = names[:n], names[n:]
    question = " ".join(f"<image> what colour is it {i}" for i in range(n))
    short = [llava([im], "<image>\nwhat colour", "red") for im in short_images]
    f = write_json(tmp_path / "data.json", [llava(long_images, question, "describe the image")] + short)
    row_len = 40  # room for one 16-token image and its text, so the long record is split many times
    data = build_image_chat_dataset(f, tok, row_len, VISION)
    assert data.num_split_docs == 1 and data.num_images == n + 3
    chunks = []
    for r in range(data.num_rows):
        runs = image_runs(data.input_ids[r], tok.image_id)
        assert [length for _, length in runs] == [P] * len(runs), f"row {r} holds a cut image: {runs}"
        for s, length in runs:  # a BOS (position 0) never lands inside an image
            assert (np.diff(data.position_ids[r, s:s + length]) == 1).all()
        images = [p.name for p in data.row_images(r)]
        assert len(images) == len(runs)  # the row's image list matches its runs
        chunks.append([im for im in images if im in long_images])
    # The long record's images come out whole, each exactly once; a row holds a consecutive stretch of them.
    assert sorted(sum(chunks, []), key=names.index) == long_images
    assert sum(len(c) > 0 for c in chunks) >= 4
    for c in chunks:
        if c:
            first = long_images.index(c[0])
            assert c == long_images[first:first + len(c)]


def test_sticky_packing_backs_off_before_a_run():
    S = 9  # the sticky (image) id
    doc = [0, 1, 2, S, S, S, S, 3, 4, 5, 6]
    sticky = [int(t == S) for t in doc]
    packed, layout = pack_with_layout([doc], None, 5, bos_id=0, pad_id=7, sticky=[sticky])
    # Plain splitting would end the first row (6 tokens) inside the run; it ends before it instead.
    pieces = [doc[s:s + n] for s, n in zip(layout.src.tolist(), layout.content_len.tolist(), strict=True)]
    assert pieces == [[0, 1, 2], [S, S, S, S, 3], [4, 5, 6]]
    assert packed.num_rows == 3 and packed.num_split_docs == 1
    for piece in pieces:
        assert piece[-1] != S


def test_sticky_packing_refuses_what_cannot_be_split():
    S = 9
    with pytest.raises(UnsplittableDocumentError, match=r"document 1: 9 tokens cannot be split into rows of 5 "
                                                        r"tokens: the run of 5 image tokens at token 2"):
        pack_with_layout([[0, 1], [0, 1, S, S, S, S, S, 2, 3]], None, 4, bos_id=0,
                         sticky=[[0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0]])
    with pytest.raises(UnsplittableDocumentError, match="document 0: ends on an image token"):
        pack_with_layout([[0, 1, S]], None, 8, bos_id=0, sticky=[[0, 0, 1]])


def test_an_image_longer_than_a_row_is_one_clear_error(tmp_path, tok):
    names = write_images(tmp_path, 2)
    f = write_json(tmp_path / "data.json", [llava(names[:1], "<image>\nwhat", "red"),
                                            llava(names, "<image> <image> what colour is it", "blue")])
    with pytest.raises(DataError) as e:
        build_image_chat_dataset(f, tok, 16, VISION)
    message = str(e.value)
    assert message.startswith(f"{f}:record 0: ")
    assert "each image is 16 tokens (32 px, patch 8): raise pack_max_length (now 16) or lower the image size" \
        in message
    assert "\n" not in message


def test_text_only_data_is_refused(tmp_path, tok):
    f = write_json(tmp_path / "data.json", [llava([], "what colour is it", "red")])
    with pytest.raises(DataError, match=r"no images in any record; a vision recipe needs image-chat data"):
        build_image_chat_dataset(f, tok, 64, VISION)


# ---------------------------------------------------------------------------------------------------------
# Built-in task


def test_builtin_task_is_drawn_once_and_reused(tmp_path, tok, monkeypatch):
    calls = []
    real = image_dataset.write_llava_dataset

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(image_dataset, "write_llava_dataset", counting)
    first = build_image_chat_dataset(None, tok, 64, VISION, builtin="shapes-caption", builtin_count=5)
    folder = builtin_dataset_dir("shapes-caption", 5, 32, "train")
    mtime = (folder / "shapes" / "data.json").stat().st_mtime_ns
    second = build_image_chat_dataset(None, tok, 64, VISION, builtin="shapes-caption", builtin_count=5)
    assert len(calls) == 1
    assert (folder / "shapes" / "data.json").stat().st_mtime_ns == mtime
    assert first.num_images == second.num_images == 5  # one caption record per image
    assert np.array_equal(first.input_ids, second.input_ids)
    assert first.row_images(0) == second.row_images(0) and first.row_images(0)[0].is_relative_to(folder)
    meta = json.loads((folder / "shapes" / "meta.json").read_text())
    assert meta["kind"] == "caption" and meta["num_images"] == 5 and meta["image_size"] == 32
    # A different key (kind, split) is its own folder: QA has several records per image.
    qa = build_image_chat_dataset(None, tok, 64, VISION, builtin="shapes-qa", builtin_count=5, split="heldout")
    assert len(calls) == 2 and qa.num_images > 5
    assert builtin_dataset_dir("shapes-qa", 5, 32, "heldout").is_dir()


def test_unknown_builtin_is_refused(tok):
    from ghostvis_core.errors import ConfigError

    with pytest.raises(ConfigError, match="builtin='shapes'.*use one of shapes-caption, shapes-qa"):
        build_image_chat_dataset(None, tok, 64, VISION, builtin="shapes")
