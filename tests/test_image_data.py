"""Image-chat readers (LLaVA json, jsonl, chat jsonl), their errors, path safety, and SigLIP-exact pixels."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ghostvis_core.data.images import (
    ImagePart,
    TextPart,
    iter_image_chats,
    load_chat_images,
    load_image,
)
from ghostvis_core.data.shapes import ShapesTask, write_llava_dataset
from ghostvis_core.data.sources import SkipReport
from ghostvis_core.errors import DataError


def _png(path, size=(20, 14), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _llava(image, question="<image>\nWhat colour?", answer="red"):
    rec = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def _json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_llava_json_normalised(tmp_path):
    a, b = _png(tmp_path / "img" / "a.png"), _png(tmp_path / "img" / "b.png")
    f = _json(tmp_path / "data.json", [
        _llava("img/a.png"),
        _llava(["img/a.png", "img/b.png"], "Compare <image> with <image>.", "same"),
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>"},
                           {"from": "gpt", "value": "ok"}], "image": "img/b.png"},
    ])
    chats = list(iter_image_chats(f))
    assert len(chats) == 3
    first = chats[0].messages
    assert [m.role for m in first] == ["user", "assistant"]
    assert first[0].parts == (ImagePart(a.resolve()), TextPart("\nWhat colour?"))
    assert first[1].parts == (TextPart("red"),)
    second = chats[1].messages[0].parts
    assert second == (TextPart("Compare "), ImagePart(a.resolve()), TextPart(" with "),
                      ImagePart(b.resolve()), TextPart("."))
    assert chats[1].image_paths == [a.resolve(), b.resolve()]
    assert [m.role for m in chats[2].messages] == ["system", "user", "assistant"]
    assert chats[1].where == f"{f}:record 1"


def test_jsonl_llava_and_chat_forms(tmp_path):
    a = _png(tmp_path / "a.png")
    chat = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "path": "a.png"},
                                     {"type": "text", "text": " colour?"}]},
        {"role": "assistant", "content": "red"}]}
    f = _jsonl(tmp_path / "d.jsonl", [_llava("a.png"), chat])
    llava, native = list(iter_image_chats(f))
    assert llava.messages == list(iter_image_chats(_json(tmp_path / "d.json", [_llava("a.png")])))[0].messages
    assert native.messages[0].parts == (TextPart("Look: "), ImagePart(a.resolve()), TextPart(" colour?"))
    assert native.where == f"{f}:2"
    # The record is ready for the tokenizer's chat template: one image placeholder per image, in place.
    assert native.template_messages() == [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"},
                                     {"type": "text", "text": " colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]


def test_image_root_and_absolute_inside(tmp_path):
    root = tmp_path / "pics"
    a = _png(root / "x" / "a.png")
    (tmp_path / "meta").mkdir()
    f = _json(tmp_path / "meta" / "d.json", [_llava("x/a.png"), _llava(str(a))])
    chats = list(iter_image_chats(f, image_root=root))
    assert [c.image_paths for c in chats] == [[a.resolve()], [a.resolve()]]
    with pytest.raises(DataError, match="not found"):
        list(iter_image_chats(f))  # default root is the data file's folder, which holds no x/a.png
    with pytest.raises(DataError, match="image root is not a folder"):
        list(iter_image_chats(f, image_root=tmp_path / "nope"))


def test_writer_output_read_back(tmp_path):
    data = write_llava_dataset(tmp_path / "shapes", 4, "caption", image_size=32, seed=5)
    chats = list(iter_image_chats(data))
    task = ShapesTask(32, seed=5)
    for i, chat in enumerate(chats):
        assert chat.messages[1].parts == (TextPart(task.sample(i).caption),)
        # PNG is lossless: what the reader decodes is exactly what was drawn.
        assert np.array_equal(np.asarray(Image.open(chat.image_paths[0])), np.asarray(task.sample(i).image))
    pixels = load_chat_images(chats[0], 32)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    qa = list(iter_image_chats(write_llava_dataset(tmp_path / "qa", 3, "qa", seed=5)))
    assert len(qa) == sum(len(task.sample(i).qa) for i in range(3))


# Each case: (records, message fragment). The file is data.json in a folder holding ok.png and bad.png.
BAD = [
    ([_llava("missing.png")], "image 'missing.png' not found (looked for {root}/missing.png)"),
    ([_llava("bad.png")], "image 'bad.png' ({root}/bad.png): not a readable image"),
    ([_llava(None, "What colour?")], "no image in the record (pass require_image=False"),
    ([_llava(["ok.png", "ok.png"])], "1 '<image>' in the conversation but 2 path(s) in 'image'"),
    ([_llava("ok.png", "no placeholder")], "0 '<image>' in the conversation but 1 path(s)"),
    ([{"image": "ok.png", "conversations": []}], "empty conversation"),
    ([{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>hi"}]}],
     "ends with a user turn; it must end with an assistant turn"),
    ([_llava(["ok.png", "ok.png"], answer="<image>")], "message 1: an assistant turn cannot hold an image"),
    ([{"image": "ok.png", "conversations": [{"from": "bot", "value": "x"}]}], "unknown 'from' 'bot'"),
    ([dict(_llava(None), image=3)], "'image' must be a path string or a list of path strings, got 3"),
    ([{"messages": [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "x"}]}],
     "text holds '<image>'"),
    ([{"messages": [{"role": "user", "content": [{"type": "image", "path": "ok.png"}]},
                    {"role": "assistant", "content": [{"type": "image", "path": "ok.png"}]}]}],
     "an assistant turn cannot hold an image"),
    ([{"text": "hi"}], "need exactly one of 'conversations' (LLaVA) or 'messages' (chat) (keys: text)"),
]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "data"
    _png(d / "ok.png")
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return d


@pytest.mark.parametrize("records, fragment", BAD)
def test_bad_records_name_file_and_index(folder, records, fragment):
    f = _json(folder / "data.json", [_llava("ok.png")] + records)  # the bad one is record 1
    root = os.path.realpath(folder)
    with pytest.raises(DataError) as e:
        list(iter_image_chats(f))
    message = str(e.value)
    print(message)
    assert message.startswith(f"{f}:record 1: ")
    assert fragment.format(root=root) in message
    assert "\n" not in message


def test_jsonl_errors_name_the_line(folder):
    f = _jsonl(folder / "d.jsonl", [_llava("ok.png"), _llava("missing.png")])
    with pytest.raises(DataError, match=rf"^{f}:2: image 'missing.png' not found"):
        list(iter_image_chats(f))


def test_the_last_bad_turn_must_be_assistant_in_chat_form(folder):
    f = _jsonl(folder / "d.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image", "path": "ok.png"}]},
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "and?"}]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: the conversation ends with a user turn"):
        list(iter_image_chats(f))


def test_skip_bad_records_counts_and_warns_once(folder, caplog):
    records = [_llava("ok.png")] + [r for rs, _ in BAD for r in rs] + [_llava("ok.png")]
    f = _json(folder / "data.json", records)
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="ghostvis"):
        chats = list(iter_image_chats(f, skip_bad_records=True, report=report))
    assert len(chats) == 2 and report.num_skipped == len(BAD) == report.per_file[str(f)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipped {len(BAD)} malformed records in {f} (first: {f}:record 1: image "
                        f"'missing.png' not found (looked for {os.path.realpath(folder)}/missing.png))"]
    # Without the image requirement the text-only record is kept.
    assert len(list(iter_image_chats(f, skip_bad_records=True, require_image=False))) == 3


def test_paths_escaping_the_root_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    _png(root / "ok.png")
    secret = _png(outside / "s.png")
    os.symlink(secret, root / "link.png")
    os.symlink(outside, root / "linkdir")
    os.symlink(root / "ok.png", root / "inside_link.png")  # a link that stays inside is fine
    f = _json(root / "d.json", [_llava("inside_link.png")])
    assert list(iter_image_chats(f))[0].image_paths == [(root / "ok.png").resolve()]
    for raw in ["../secret/s.png", str(secret), "link.png", "linkdir/s.png", "sub/../../secret/s.png"]:
        f = _json(root / "d.json", [_llava("ok.png"), _llava(raw)])
        with pytest.raises(DataError) as e:
            list(iter_image_chats(f))
        assert str(e.value).startswith(
            f"{f}:record 1: image {raw!r} resolves to {secret.resolve()}, outside the image root "
            f"{root.resolve()}"), str(e.value)
        skipped = SkipReport()
        assert len(list(iter_image_chats(f, skip_bad_records=True, report=skipped))) == 1
        assert skipped.num_skipped == 1


def test_decode_error_at_load_time_names_record_and_path(folder):
    f = _json(folder / "data.json", [_llava("ok.png"), _llava("bad.png")])
    chats = list(iter_image_chats(f, check_images=False))  # the header check is off: found at load time
    with pytest.raises(DataError, match=rf"^{f}:record 1: image {os.path.realpath(folder)}/bad.png: not a "
                                        "readable image"):
        load_chat_images(chats[1], 32)
    with pytest.raises(DataError, match=r"bad.png: not a readable image"):
        load_image(folder / "bad.png", 32)
    with pytest.raises(DataError, match=r"nothing.png: no such file"):
        load_image(folder / "nothing.png", 32)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        list(iter_image_chats(tmp_path / "none.json"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="must be LLaVA .json or .jsonl"):
        list(iter_image_chats(tmp_path / "d.csv"))
    (tmp_path / "d.json").write_text('{"image": "a.png"}')
    with pytest.raises(DataError, match="holds one JSON array of records, got dict"):
        list(iter_image_chats(tmp_path / "d.json"))
    (tmp_path / "d.json").write_text('[{"image": ]')
    with pytest.raises(DataError, match=r"d.json:1: invalid JSON"):
        list(iter_image_chats(tmp_path / "d.json"))


def _images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L")
    out = {}
    for name, im in [("rgb.png", rgb), ("rgba.png", rgba), ("grey.png", grey), ("p.png", rgb.convert("P")),
                     ("rgb.jpg", rgb)]:
        im.save(tmp_path / name)
        out[name] = tmp_path / name
    return out


def test_load_image_matches_siglip_processor(tmp_path):
    # Without torchvision, SiglipImageProcessor resolves to this PIL backend; it is what we match.
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    for size in (32, 224):
        proc = SiglipImageProcessorPil(size={"height": size, "width": size})
        for name, path in _images(tmp_path).items():
            ours = load_image(path, size)
            theirs = proc(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
            diff = (ours - theirs).abs()
            print(f"{name} {size}px: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
            assert ours.shape == theirs.shape == (3, size, size) and ours.dtype == torch.float32
            # Same Pillow resize and the same float arithmetic: identical, bound 1e-6 for safety.
            assert diff.max().item() <= 1e-6


def test_records_encode_with_one_image_token_per_image(tmp_path):
    from ghostvis_core.tokenizer import Tokenizer

    tok = Tokenizer.train(["a red circle at top left and a small blue square"] * 20, vocab_size=300)
    _png(tmp_path / "a.png")
    f = _json(tmp_path / "d.json", [_llava(["a.png", "a.png"], "<image> and <image>: same?", "yes")])
    chat = next(iter_image_chats(f))
    ids, mask = tok.encode_chat(chat.template_messages())
    # The packing step will expand each <image> id into the tower's token count; here it is one id per image.
    assert ids.count(tok.image_id) == len(chat.image_paths) == 2
    assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == tok.image_id)


def test_nul_byte_in_path_is_a_record_error(folder):
    f = _json(folder / "data.json", [_llava("ok\u0000.png")])
    with pytest.raises(DataError, match=r"data.json:record 0: image path 'ok\\x00.png' holds a NUL byte"):
        list(iter_image_chats(f))
