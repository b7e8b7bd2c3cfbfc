"""Reading documents and chats from files, with `FILE:LINE: what is wrong` for every malformed record.

Formats (kind="auto" picks by suffix; a folder means every matching file in it, sorted by name):
- txt (.txt, .md, .text): UTF-8; documents are paragraphs separated by one or more blank lines (a line
  that is empty or only whitespace). A file holding one document simply has no blank lines.
- jsonl (.jsonl, .ndjson): one JSON object per line with a string field (default "text"; `text_column`).
- parquet (.parquet, .pq): a string column (default "text"; `text_column`), read with pyarrow.
- chat jsonl (`iter_chats`): one {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  per line, with at least one assistant message.

Blank lines in jsonl files are ignored. With skip_bad_records=True a malformed record is counted and
skipped, and one warning per file says how many: "skipped 3 malformed records in FILE (first: FILE:12: ...)".
A missing file, an unknown suffix, a parquet file without the column and a file with no documents are
always errors. Every rank reads the same documents; the loader shards the packed rows (see loader.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostvis_core.errors import DataError
from ghostvis_core.log import get_logger
from ghostvis_core.tokenizer import ROLES

TEXT_KINDS = ("txt", "jsonl", "parquet")
SUFFIX_KIND = {
    ".txt": "txt", ".md": "txt", ".text": "txt",
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}


@dataclass
class SkipReport:
    """Malformed records skipped while reading with skip_bad_records=True."""

    num_skipped: int = 0
    """Records skipped over all files."""
    first_error: str | None = None
    """The first skipped record's message (FILE:LINE: ...)."""
    per_file: dict[str, int] = field(default_factory=dict)
    """Skipped records per file path."""

    def summary(self, path: str) -> str:
        """'skipped N malformed records in FILE (first: FILE:LINE: ...)' for one file."""
        return f"skipped {self.per_file.get(path, 0)} malformed records in {path} (first: {self.first_error})"


class _Records:
    """Per-file error policy: raise at the first malformed record, or count it and go on."""

    def __init__(self, path: Path, skip: bool, report: SkipReport):
        self.path, self.skip, self.report = str(path), skip, report
        self.first_in_file: str | None = None

    def bad(self, where: int | str, what: str) -> None:
        message = f"{self.path}:{where}: {what}"
        if not self.skip:
            raise DataError(message + " (fix the record, or pass skip_bad_records to skip malformed records)")
        self.report.num_skipped += 1
        self.report.first_error = self.report.first_error or message
        self.first_in_file = self.first_in_file or message
        self.report.per_file[self.path] = self.report.per_file.get(self.path, 0) + 1

    def finish(self, num_good: int) -> None:
        skipped = self.report.per_file.get(self.path, 0)
        if num_good == 0:
            if skipped:
                raise DataError(f"{self.path}: no valid records (all {skipped} malformed; first: "
                                f"{self.first_in_file})")
            raise DataError(f"{self.path}: empty file (no documents); add data or point at another file")
        if skipped:
            get_logger().warning("skipped %d malformed records in %s (first: %s)",
                                 skipped, self.path, self.first_in_file)


def _files(path: str | os.PathLike, kind: str, allowed: tuple[str, ...]) -> list[tuple[Path, str]]:
    """Expand `path` (file or folder) into [(file, kind)], checking existence and kind."""
    if kind != "auto" and kind not in allowed:
        raise DataError(f"unknown data kind {kind!r}; use auto or one of {', '.join(allowed)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder; check the path, or omit it to use the embedded data")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and SUFFIX_KIND.get(f.suffix.lower()) in allowed
                       and (kind == "auto" or SUFFIX_KIND[f.suffix.lower()] == kind))
        if not files:
            raise DataError(f"{p}: folder holds no {'/'.join(allowed)} files "
                            f"(suffixes {', '.join(s for s, k in SUFFIX_KIND.items() if k in allowed)})")
    else:
        files = [p]
    out = []
    for f in files:
        k = SUFFIX_KIND.get(f.suffix.lower()) if kind == "auto" else kind
        if k not in allowed:
            raise DataError(f"{f}: cannot tell the format from the suffix {f.suffix!r}; "
                            f"rename it or pass kind= one of {', '.join(allowed)}")
        out.append((f, k))
    return out


def data_files(path: str | os.PathLike, kind: str = "auto", chat: bool = False) -> list[tuple[Path, str]]:
    """[(file, kind)] that iter_documents (or, with chat=True, iter_chats) reads from `path`, in reading order."""
    return _files(path, "jsonl", ("jsonl",)) if chat else _files(path, kind, TEXT_KINDS)


def _read_utf8_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                        "convert the file to UTF-8") from e
    return text.splitlines()


def _iter_txt(path: Path, rec: _Records) -> Iterator[str]:
    paragraph: list[str] = []
    count = 0
    for line in _read_utf8_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            count += 1
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        count += 1
        yield "\n".join(paragraph)
    rec.finish(count)


def _iter_json_objects(path: Path, rec: _Records) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(_read_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rec.bad(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            rec.bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield lineno, obj


def _is_utf8(text: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot encode (lone surrogate escapes like \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_jsonl(path: Path, rec: _Records, text_column: str) -> Iterator[str]:
    count = 0
    for lineno, obj in _iter_json_objects(path, rec):
        text = obj.get(text_column)
        if text_column not in obj:
            rec.bad(lineno, f"missing {text_column!r} field (keys: {', '.join(map(str, obj)) or 'none'})")
        elif not isinstance(text, str):
            rec.bad(lineno, f"{text_column!r} must be a string, got {type(text).__name__}")
        elif not text.strip():
            rec.bad(lineno, f"{text_column!r} is empty")
        elif not _is_utf8(text):
            rec.bad(lineno, f"{text_column!r} holds an unpaired surrogate escape (e.g. \\ud800): not valid text")
        else:
            count += 1
            yield text
    rec.finish(count)


def _iter_parquet(path: Path, rec: _Records, text_column: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'ghostvis[data]'") from e
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{path}: no column {text_column!r}; available columns: {', '.join(names) or 'none'} "
                        "(pass text_column=NAME)")
    col_type = pf.schema_arrow.field(text_column).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"{path}: column {text_column!r} has type {col_type}, expected string")
    row, count = 0, 0
    for batch in pf.iter_batches(columns=[text_column], batch_size=8192):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                rec.bad(f"row {row}", f"{text_column!r} is null")
            elif not text.strip():
                rec.bad(f"row {row}", f"{text_column!r} is empty")
            else:
                count += 1
                yield text
    rec.finish(count)


def iter_documents(
    path: str | os.PathLike,
    kind: str = "auto",
    text_column: str = "text",
    skip_bad_records: bool = False,
    report: SkipReport | None = None,
) -> Iterator[str]:
    """Yield document texts from a txt/jsonl/parquet file or folder; DataError 'FILE:LINE: ...' when malformed."""
    report = report if report is not None else SkipReport()
    for f, k in data_files(path, kind):
        rec = _Records(f, skip_bad_records, report)
        if k == "txt":
            yield from _iter_txt(f, rec)
        elif k == "jsonl":
            yield from _iter_jsonl(f, rec, text_column)
        else:
            yield from _iter_parquet(f, rec, text_column)


def _check_chat(obj: dict) -> str | list[dict[str, str]]:
    """The cleaned message list, or a string saying what is wrong."""
    if "messages" not in obj:
        return f"missing 'messages' field (keys: {', '.join(map(str, obj)) or 'none'})"
    messages: Any = obj["messages"]
    if not isinstance(messages, list):
        return f"'messages' must be a list, got {type(messages).__name__}"
    if not messages:
        return "'messages' is empty"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} must be an object, got {type(m).__name__}"
        if "role" not in m or "content" not in m:
            return f"message {i} needs 'role' and 'content' (has: {', '.join(map(str, m)) or 'nothing'})"
        if m["role"] not in ROLES:
            return f"message {i}: unknown role {m['role']!r} (use one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"message {i}: content must be a string, got {type(m['content']).__name__}"
        if not _is_utf8(m["content"]):
            return f"message {i}: content holds an unpaired surrogate escape (e.g. \\ud800): not valid text"
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        return "no assistant message (nothing to learn from)"
    return out


def iter_chats(
    path: str | os.PathLike, skip_bad_records: bool = False, report: SkipReport | None = None
) -> Iterator[list[dict[str, str]]]:
    """Yield message lists from a chat jsonl file or folder; DataError 'FILE:LINE: ...' when malformed."""
    report = report if report is not None else SkipReport()
    for f, _ in data_files(path, chat=True):
        known = SUFFIX_KIND.get(f.suffix.lower())
        if known not in (None, "jsonl"):
            raise DataError(f"{f}: a {known} file, but chat data is jsonl: one {{\"messages\": [...]}} per line")
        rec = _Records(f, skip_bad_records, report)
        count = 0
        for lineno, obj in _iter_json_objects(f, rec):
            checked = _check_chat(obj)
            if isinstance(checked, str):
                rec.bad(lineno, checked)
            else:
                count += 1
                yield checked
        rec.finish(count)
