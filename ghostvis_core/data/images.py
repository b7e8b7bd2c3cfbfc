"""Reading image-chat data into one record type, and turning image files into the tower's pixel tensors.

Formats (a file, or a folder meaning every .json/.jsonl/.ndjson file in it, sorted by name):
- LLaVA json (.json): one JSON array of {"image": "rel/path.jpg" | ["a.jpg", "b.jpg"], "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}.
- jsonl (.jsonl, .ndjson): one object per line, either the LLaVA fields above or a chat
  {"messages": [{"role": "user", "content": [{"type": "image", "path": "..."}, {"type": "text",
  "text": "..."}]}, {"role": "assistant", "content": "..."}]} (content may also be a plain string).

Every record becomes an `ImageChat`: messages (user/assistant/system; LLaVA's human -> user, gpt ->
assistant) whose parts are `TextPart`s and `ImagePart`s in order, each "<image>" of a LLaVA string split out
into an image part at its position and matched, in order, with the record's image paths. Image paths are
relative to `image_root` (default: the data file's folder); one that leaves the root (`../`, an absolute path
elsewhere, a symlink pointing out) is refused, so a data file cannot make us read arbitrary files.

Errors name the record: `FILE:record N: ...` in a json array (N counts from 0) and `FILE:LINE: ...` in jsonl,
as the text readers in sources.py do; with skip_bad_records=True a bad record is counted, skipped and
reported in one warning per file (sources.py's policy, reused).

Pixels: `load_image` does what transformers' SiglipImageProcessor does (the PIL backend, which is what it
resolves to without torchvision): RGB conversion compositing transparency onto white, bicubic resize to
image_size x image_size with Pillow, rescale by 1/255 (in float64, then float32), then (x - mean) / std with
mean = std = 0.5 for SigLIP. Shape legend: C = 3 channels, H = W = image_size, I = images of one record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from ghostvis_core.data.sources import SkipReport, _is_utf8, _iter_json_objects, _Records
from ghostvis_core.errors import ConfigError, DataError
from ghostvis_core.tokenizer import IMAGE, ROLES
from ghostvis_core.vision_config import SIGLIP_MEAN, SIGLIP_STD

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
DATA_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Errors Pillow raises for a file that is there but is not a decodable image (truncated, wrong format,
# a decompression bomb over Pillow's pixel limit).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True, slots=True)
class TextPart:
    """A piece of message text."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image, by its resolved path inside the image root."""

    path: Path


Part = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ImageMessage:
    """One turn: role ("system" | "user" | "assistant") and its parts in order."""

    role: str
    parts: tuple[Part, ...]


@dataclass(frozen=True, slots=True)
class ImageChat:
    """One record: its messages, and where it came from (for errors raised later, in decoding)."""

    messages: tuple[ImageMessage, ...]
    where: str
    """'FILE:record N' (json) or 'FILE:LINE' (jsonl)."""
    kind: str | None = None
    """The record's "kind" string when it has one (the built-in task's question kind, for `ghostvis eval`)."""

    @property
    def image_paths(self) -> list[Path]:
        """The record's images in the order they appear in the conversation (the order the tokens take)."""
        return [p.path for m in self.messages for p in m.parts if isinstance(p, ImagePart)]

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as `Tokenizer.encode_chat` takes them: one {"type": "image"} per image, in place."""
        return [
            {"role": m.role, "content": [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
                for p in m.parts
            ]}
            for m in self.messages
        ]


# ---- normalising one record ----------------------------------------------------------------------------

def _split_image_tokens(text: str) -> list[tuple[str, str]]:
    """'<image>\\nWhat is it?' -> [("image", ""), ("text", "\\nWhat is it?")]; empty text pieces dropped."""
    pieces = text.split(IMAGE)
    out = [("text", pieces[0])] if pieces[0] else []
    for piece in pieces[1:]:
        out.append(("image", ""))
        if piece:
            out.append(("text", piece))
    return out


def _llava_messages(obj: dict) -> str | list[tuple[str, list[tuple[str, str]]]]:
    """[(role, [(kind, text or raw path)])] of a LLaVA record, or a string saying what is wrong."""
    turns = obj["conversations"]
    if not isinstance(turns, list):
        return f"'conversations' must be a list, got {type(turns).__name__}"
    images: Any = obj.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return f"'image' must be a path string or a list of path strings, got {obj.get('image')!r:.80}"
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"turn {i} must be an object with 'from' and 'value', got {turn!r:.80}"
        if turn["from"] not in LLAVA_ROLES:
            return f"turn {i}: unknown 'from' {turn['from']!r} (use one of {', '.join(LLAVA_ROLES)})"
        if not isinstance(turn["value"], str) or not _is_utf8(turn["value"]):
            return f"turn {i}: 'value' must be a valid text string, got {turn['value']!r:.80}"
        messages.append((LLAVA_ROLES[turn["from"]], _split_image_tokens(turn["value"])))
    slots = [part for _, parts in messages for part in parts if part[0] == "image"]
    if len(slots) != len(images):
        return (f"{len(slots)} '{IMAGE}' in the conversation but {len(images)} path(s) in 'image'; "
                f"put one '{IMAGE}' where each image goes")
    paths = iter(images)
    return [(role, [("image", next(paths)) if kind == "image" else (kind, text) for kind, text in parts])
            for role, parts in messages]


def _chat_messages(obj: dict) -> str | list[tuple[str, list[tuple[str, str]]]]:
    """[(role, [(kind, text or raw path)])] of a {"messages": [...]} record, or what is wrong."""
    raw = obj["messages"]
    if not isinstance(raw, list):
        return f"'messages' must be a list, got {type(raw).__name__}"
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} must be an object with 'role' and 'content', got {m!r:.80}"
        if m["role"] not in ROLES:
            return f"message {i}: unknown role {m['role']!r} (use one of {', '.join(ROLES)})"
        content = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        if not isinstance(content, list):
            return f"message {i}: content must be a string or a list of parts, got {type(content).__name__}"
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" and isinstance(part.get("path"), str):
                parts.append(("image", part["path"]))
            elif kind == "text" and isinstance(part.get("text"), str) and _is_utf8(part["text"]):
                if IMAGE in part["text"]:
                    # A literal "<image>" would silently stay text (the tokenizer never reads it as special).
                    return (f"message {i}: text holds '{IMAGE}'; in chat jsonl give images as "
                            "{'type': 'image', 'path': ...} parts")
                if part["text"]:
                    parts.append(("text", part["text"]))
            else:
                return (f"message {i}: content part {j} must be {{'type': 'text', 'text': str}} or "
                        f"{{'type': 'image', 'path': str}}, got {part!r:.80}")
        messages.append((m["role"], parts))
    return messages


def _normalise(obj: dict, require_image: bool) -> str | list[tuple[str, list[tuple[str, str]]]]:
    """Messages of either record form with the checks every record gets, or what is wrong."""
    has_llava, has_chat = "conversations" in obj, "messages" in obj
    if has_llava == has_chat:
        keys = ", ".join(map(str, obj)) or "none"
        return f"need exactly one of 'conversations' (LLaVA) or 'messages' (chat) (keys: {keys})"
    if obj["conversations" if has_llava else "messages"] == []:
        return "empty conversation"
    messages = _llava_messages(obj) if has_llava else _chat_messages(obj)
    if isinstance(messages, str):
        return messages
    for i, (role, parts) in enumerate(messages):
        if role == "assistant" and any(kind == "image" for kind, _ in parts):
            return f"message {i}: an assistant turn cannot hold an image"
    if messages[-1][0] != "assistant":
        return (f"the conversation ends with a {messages[-1][0]} turn; it must end with an assistant turn "
                "(the answer to learn)")
    if require_image and not any(kind == "image" for _, parts in messages for kind, _ in parts):
        return "no image in the record (pass require_image=False to allow text-only records)"
    return messages


# ---- image paths and pixels ----------------------------------------------------------------------------

def resolve_image_path(raw: str, image_root: Path) -> Path | str:
    """The real path of image `raw` under image_root (a resolved folder), or a string saying what is wrong."""
    if not raw.strip():
        return "an image path is empty"
    if "\0" in raw:
        return f"image path {raw!r} holds a NUL byte"
    # realpath follows every symlink, so a link inside the root that points outside is caught too.
    real = Path(os.path.realpath(image_root / raw))
    if not real.is_relative_to(image_root):
        return (f"image {raw!r} resolves to {real}, outside the image root {image_root}; image paths must "
                "stay inside the image root (move the images there, or pass a wider image_root)")
    if not real.is_file():
        return f"image {raw!r} not found (looked for {real})"
    return real


def _open_rgb(path: Path, verify_only: bool = False) -> Image.Image | str:
    """The image as RGB (transparency composited onto white, as transformers does), or what is wrong."""
    try:
        with Image.open(path) as im:
            if verify_only:
                im.verify()  # header and checksums only, no full decode: cheap enough at read time
                return im
            im.load()
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        return "no such file"
    except _PIL_ERRORS as e:
        return f"not a readable image ({type(e).__name__}: {e}); replace or remove the file"


def _to_pixels(
    image: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # Same arithmetic as transformers' rescale (float64 * 1/255 -> float32) and normalize (float32), so the
    # result matches SiglipImageProcessor's pixel_values exactly, not just closely.
    x_HWC = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
    x_HWC = (x_HWC - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x_HWC.transpose(2, 0, 1)))


def _check_size(image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size={image_size!r} must be a positive integer (the tower's image size)")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ConfigError(f"mean={tuple(mean)} and std={tuple(std)} need 3 values each, std > 0")


def load_image(
    path: str | os.PathLike | BinaryIO,
    image_size: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> torch.Tensor:
    """(C, H, W) float32 pixels of an image file (a path, or a binary file object such as an uploaded
    image's bytes in io.BytesIO), as SiglipImageProcessor gives; DataError if unreadable."""
    _check_size(image_size, mean, std)
    image = _open_rgb(path if hasattr(path, "read") else Path(path))
    if isinstance(image, str):
        raise DataError(f"{path}: {image}")
    return _to_pixels(image, image_size, mean, std)


def load_chat_images(
    chat: ImageChat,
    image_size: int,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> torch.Tensor:
    """(I, C, H, W) pixels of a record's images in order; a decoding error names the record and the path."""
    _check_size(image_size, mean, std)
    out_ICHW = torch.empty(len(chat.image_paths), 3, image_size, image_size)
    for i, path in enumerate(chat.image_paths):
        image = _open_rgb(path)
        if isinstance(image, str):
            raise DataError(f"{chat.where}: image {path}: {image}")
        out_ICHW[i] = _to_pixels(image, image_size, mean, std)
    return out_ICHW


# ---- files ---------------------------------------------------------------------------------------------

def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no image-chat files (suffixes {', '.join(DATA_SUFFIXES)})")
        return files
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{path}: image-chat data must be LLaVA .json or .jsonl/.ndjson, got suffix "
                        f"{path.suffix!r}; rename the file if it is one of those")
    return [path]


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """('record N', obj) for each element of a json array file; a file that is not one is one error."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: a LLaVA .json file holds one JSON array of records, got "
                        f"{type(data).__name__} "
                        "(one object per line is .jsonl)")
    for i, obj in enumerate(data):
        yield f"record {i}", obj


def iter_image_chats(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    require_image: bool = True,
    check_images: bool = True,
    skip_bad_records: bool = False,
    report: SkipReport | None = None,
) -> Iterator[ImageChat]:
    """Yield normalised records of LLaVA json / jsonl / chat jsonl files; DataError naming FILE and record.

    image_root: folder image paths are relative to (default: each data file's folder). require_image: a
    record without an image is malformed. check_images: open each image's header (and checksums) now, so
    a missing or broken file is reported (or skipped) here rather than mid-training in a loader worker.
    """
    report = report if report is not None else SkipReport()
    root_given = None
    if image_root is not None:
        root_given = Path(os.path.realpath(Path(image_root).expanduser()))
        if not root_given.is_dir():
            raise DataError(f"{image_root}: the image root is not a folder; pass the folder the image paths "
                            "are relative to")
    for f in _data_files(Path(path).expanduser()):
        root = root_given or Path(os.path.realpath(f.parent))
        rec = _Records(f, skip_bad_records, report)
        if DATA_SUFFIXES[f.suffix.lower()] == "json":
            records: Iterator[tuple[Any, Any]] = _json_records(f)
        else:
            records = _iter_json_objects(f, rec)
        count = 0
        # Images already checked in this file: QA data asks several questions about one image.
        checked: set[Path] | None = set() if check_images else None
        for where, obj in records:
            chat = _record(obj, root, require_image, checked)
            if isinstance(chat, str):
                rec.bad(where, chat)
                continue
            count += 1
            kind = obj.get("kind")  # _record accepted obj, so it is a dict
            yield ImageChat(tuple(ImageMessage(role, parts) for role, parts in chat), f"{f}:{where}",
                            kind if isinstance(kind, str) else None)
        rec.finish(count)


def _record(
    obj: Any, root: Path, require_image: bool, checked: set[Path] | None
) -> str | list[tuple[str, tuple]]:
    """[(role, parts)] with resolved image paths, or what is wrong; checked: images verified so far (None: off)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    messages = _normalise(obj, require_image)
    if isinstance(messages, str):
        return messages
    out = []
    for role, raw_parts in messages:
        parts: list[Part] = []
        for kind, value in raw_parts:
            if kind == "text":
                parts.append(TextPart(value))
                continue
            resolved = resolve_image_path(value, root)
            if isinstance(resolved, str):
                return resolved
            if checked is not None and resolved not in checked:
                opened = _open_rgb(resolved, verify_only=True)
                if isinstance(opened, str):
                    return f"image {value!r} ({resolved}): {opened}"
                checked.add(resolved)
            parts.append(ImagePart(resolved))
        out.append((role, tuple(parts)))
    return out
