"""`ghostvis infer --batch-file`: prompts in (txt or jsonl), results out as JSON lines that survive interruption.

A jsonl line is {"prompt": "..."} or, for a vision run, {"prompt": "...", "image": "scene.png"}; a relative
image path is taken from the batch file's folder, so a folder of images and its jsonl work from anywhere.

Each result is one whole line appended with flush + fsync as its request finishes, carrying the prompt's
index, so an interrupted run keeps every finished line; `--resume` skips the indices already there. A line cut
short by a crash (no trailing newline) is truncated away on resume, so the file never holds a half result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ghostvis_core.errors import DataError


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of a batch file: its text, its image (resolved, checked to exist) and where it came from."""

    text: str
    image: Path | None = None
    image_field: str | None = None
    """The "image" value as the line wrote it (the result line repeats it)."""
    where: str = ""
    """"FILE:LINE", for messages."""


def read_prompts(path: str | os.PathLike) -> list[BatchPrompt]:
    """Prompts of a .txt (one per non-empty line) or .jsonl ({"prompt": "...", "image": optional} per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--batch-file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[BatchPrompt] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be {{\"prompt\": ...}}") from None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{path}:{n}: needs a non-empty string \"prompt\" field")
            prompts.append(BatchPrompt(prompt, *_image(record.get("image"), path, n), where=f"{path}:{n}"))
    elif path.suffix == ".txt":
        prompts = [BatchPrompt(line, where=f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    else:
        raise DataError(f"--batch-file {path}: expected a .txt (one prompt a line) or .jsonl file")
    if not prompts:
        raise DataError(f"--batch-file {path} has no prompts: add one per line")
    return prompts


def _image(value, path: Path, n: int) -> tuple[Path | None, str | None]:
    """The line's "image" (None when absent), relative to the batch file's folder, checked to exist."""
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{n}: \"image\" must be a non-empty path string")
    image = Path(value).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise DataError(f"{path}:{n}: image {value!r}: no such file ({image})")
    return image, value


class ResultsFile:
    """The --output JSON-lines file: done indices on open, whole-line durable appends."""

    def __init__(self, path: str | os.PathLike, resume: bool):
        self.path = Path(path)
        self.done: set[int] = set()
        if self.path.exists() and self.path.stat().st_size:
            if not resume:
                raise DataError(f"--output {self.path} already has results: pass --resume to continue it, "
                                "or choose another file")  # fmt: skip
            self._recover()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # bytes after the last newline are a line cut short by a crash
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for n, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
            try:
                self.done.add(int(json.loads(line)["index"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DataError(f"{self.path}:{n}: not a result line of `ghostvis infer` (no \"index\"); "
                                "it cannot be resumed: choose another --output") from None

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
