"""Read raw text files into corpus documents `{"text", "id", "source", "meta"}`, one file at a time.

Supported: `.txt`/`.md` (one document per file, streamed; a file longer than `text_max_chars`
becomes consecutive documents, see `_text_pieces`), `.jsonl`/`.json` (one JSON object per line),
`.parquet` (streamed by record batch), directories (recursive) and glob patterns.
"""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import CorpusError

TEXT_SUFFIXES = {".txt", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}
# A text file is read 1 MiB at a time and never held whole: a document longer than this many
# characters is cut (at a blank line, else a line break, where one is near) into several.
TEXT_MAX_CHARS = 1_000_000
_READ_BYTES = 1 << 20


def iter_documents(
    paths: str | Path | Sequence[str | Path],
    *,
    text_key: str = "text",
    skip_bad: bool = False,
    stats: dict | None = None,
    text_max_chars: int = TEXT_MAX_CHARS,
) -> Iterator[dict]:
    """Yield the non-empty documents of `paths` in a deterministic order.

    With `skip_bad`, undecodable files and malformed records are skipped and counted in `stats`
    (`skipped_files`, `skipped_paths`, `skipped_records`) instead of raising `CorpusError`.
    A `.txt`/`.md` file longer than `text_max_chars` characters is split into documents of at
    most that length (counted in `stats["split_text_files"]`).
    """
    if text_max_chars < 1:
        raise CorpusError(f"text_max_chars must be >= 1, got {text_max_chars}")
    stats = {} if stats is None else stats
    stats.update(
        files=0,
        documents=0,
        skipped_files=0,
        skipped_paths=[],
        skipped_records=0,
        split_text_files=0,
    )
    for file in resolve_files(paths):
        stats["files"] += 1
        try:
            for doc in _read_file(file, text_key, skip_bad, stats, text_max_chars):
                if doc["text"]:
                    stats["documents"] += 1
                    yield doc
        except CorpusError:
            if not skip_bad:
                raise
            stats["skipped_files"] += 1
            stats["skipped_paths"].append(str(file))
    if stats["documents"] == 0:
        raise CorpusError(f"the corpus {_describe(paths)} is empty: it has no non-empty documents")


def resolve_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand directories and glob patterns into a sorted, de-duplicated list of corpus files."""
    files: list[Path] = []
    for item in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(item)
        if path.is_dir():
            files += _files_under(path)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise CorpusError(f"{path}: unsupported file type (use one of {sorted(SUFFIXES)})")
            files.append(path)
        elif any(c in str(item) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise CorpusError(f"no files match the pattern {item}")
            for match in matches:
                files += _files_under(match) if match.is_dir() else _supported([match])
        else:
            raise CorpusError(f"corpus path {path} does not exist")
    return list(dict.fromkeys(files))


def _files_under(directory: Path) -> list[Path]:
    return _supported(sorted(p for p in directory.rglob("*") if p.is_file()))


def _supported(files: list[Path]) -> list[Path]:
    return [f for f in files if f.suffix.lower() in SUFFIXES]


def _describe(paths: str | Path | Sequence[str | Path]) -> str:
    return str(paths) if isinstance(paths, (str, Path)) else ", ".join(map(str, paths))


def _read_file(
    path: Path, text_key: str, skip_bad: bool, stats: dict, text_max_chars: int
) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # Validate first so that a bad file is rejected (or skipped) before any of it is yielded.
        _check_utf8(path)
        for number, text in enumerate(_text_pieces(path, text_max_chars)):
            if number == 1:
                stats["split_text_files"] += 1
            name = str(path) if number == 0 else f"{path}#{number}"
            yield {"text": text, "id": name, "source": str(path), "meta": {}}
        return
    if suffix in JSON_SUFFIXES:
        # Validate first so that a bad file is rejected (or skipped) before any of it is yielded.
        _check_utf8(path)
        rows = _jsonl_rows(path)
    else:
        rows = _parquet_rows(path, text_key)
    for number, where, row in rows:
        try:
            obj = json.loads(row) if isinstance(row, str) else row
            doc = _record(obj, text_key, default_id=f"{path}:{number}", source=str(path))
        except (ValueError, CorpusError) as e:
            if not skip_bad:
                raise CorpusError(f"{path}, {where} {number}: {e}") from None
            stats["skipped_records"] += 1
            continue
        yield doc


def _check_utf8(path: Path) -> None:
    """Raise CorpusError at the first invalid UTF-8 byte, reading 1 MiB at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            # The decoder holds back an incomplete trailing sequence; errors count from its start.
            start = offset - len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, start + e.start) from None
            if not chunk:
                return
            offset += len(chunk)


def _text_pieces(path: Path, limit: int) -> Iterator[str]:
    """The text of a UTF-8 file (already validated) in pieces of at most `limit` characters,
    decoded 1 MiB at a time: memory is about `limit` characters plus one read, not the file.

    Joined in order the pieces give back the file (without a leading byte-order mark); a file
    within the limit is one piece, as before. Where a piece ends: see `_cut`."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    parts: list[str] = []
    size = 0
    with path.open("rb") as f:
        while True:
            data = f.read(_READ_BYTES)
            text = decoder.decode(data, final=not data)
            if text:
                parts.append(text)
                size += len(text)
            if size > limit:
                # Parts are joined only when a piece is due: no quadratic re-concatenation.
                pending = "".join(parts)
                while len(pending) > limit:
                    yield pending[: (cut := _cut(pending, limit))]
                    pending = pending[cut:]
                parts, size = [pending], len(pending)
            if not data:
                break
    if size:
        yield "".join(parts)


def _cut(text: str, limit: int) -> int:
    """Where to end a piece of `text` (longer than `limit`): after the last blank line in the
    second half of the first `limit` characters, else after the last line break there, else at
    exactly `limit` (one huge line). The second half: no piece shorter than limit / 2 but the
    last."""
    half = limit // 2
    at = text.rfind("\n\n", half, limit)
    if at >= 0:
        return at + 2
    at = text.rfind("\n", half, limit)
    return at + 1 if at >= 0 else limit


def _not_utf8(path: Path, offset: int) -> CorpusError:
    return CorpusError(f"{path} is not valid UTF-8: first bad byte at offset {offset}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, str]]:
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, "line", line


def _parquet_rows(path: Path, text_key: str) -> Iterator[tuple[int, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        if text_key not in names:
            raise CorpusError(f"{path} has no {text_key!r} column (columns: {', '.join(names)})")
        # Record batches keep memory bounded however large the row groups are.
        number = 0
        for batch in reader.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, "row", row
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read Parquet file {path}: {e}") from None


def _record(obj: Any, text_key: str, *, default_id: str, source: str) -> dict:
    """Turn one JSON object or Parquet row into a corpus document; unknown fields go to meta."""
    if not isinstance(obj, dict):
        raise CorpusError(f"expected a JSON object, got {type(obj).__name__}")
    if text_key not in obj:
        raise CorpusError(f"no {text_key!r} field (fields: {', '.join(sorted(obj)) or 'none'})")
    text = obj[text_key]
    if not isinstance(text, str):
        raise CorpusError(f"field {text_key!r} is {type(text).__name__}, not a string")
    meta = obj["meta"] if isinstance(obj.get("meta"), dict) else {}
    extra = {k: v for k, v in obj.items() if k not in (text_key, "id", "source", "meta")}
    return {
        "text": text,
        "id": default_id if obj.get("id") is None else obj["id"],
        "source": obj.get("source") or source,
        "meta": meta | extra,
    }
