"""Input discovery and streaming reads: json (array), jsonl, parquet, csv, arrow, txt, or a folder of one kind.

jsonl and txt are read line by line here (they carry `file:line` locations and are the multi-GB case);
the other formats stream through HF `datasets` (streaming=True), one file at a time, located by record
number. Nothing reads a whole file into memory except a JSON array, which cannot be streamed.

A line longer than the record limit is never read whole: it is passed on as TooLarge (a bad record) after
reading at most the limit and skipping the rest, so memory stays bounded whatever the input holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.errors import UserError

_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow",
          ".txt": "txt"}
# metadata that HF `save_to_disk` writes beside .arrow files
_ARROW_METADATA = {"dataset_info.json", "state.json"}


SKIP_BYTES = 1 << 20  # read size while skipping the rest of an over-long line


@dataclass(frozen=True)
class TooLarge:
    """Stands for a line over the record limit (its text is not kept); encode reports it as a bad record."""

    nbytes: int


def discover(path: str, key: str = "--input") -> tuple[list[Path], str]:
    """The input files (sorted) and their kind; UserError when missing, empty, mixed, or not a regular file or
    folder (a FIFO or device would block or read nothing). key: how messages name the input."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{key} {path}: no such file or folder")
    if not p.is_file() and not p.is_dir():
        raise UserError(f"{key} {path}: not a regular file or folder (a pipe or device); give a data file or folder")
    if p.is_file():
        kind = _KINDS.get(p.suffix.lower())
        if kind is None:
            raise UserError(f"{path}: unsupported file type '{p.suffix}'; use one of {', '.join(_KINDS)}")
        return [p], _json_kind(p) if kind == "json" else kind
    with _reading(p):
        files = sorted(f for f in p.iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _KINDS)
    if any(f.suffix.lower() == ".arrow" for f in files):
        files = [f for f in files if f.name not in _ARROW_METADATA]
    kinds = {_json_kind(f) if _KINDS[f.suffix.lower()] == "json" else _KINDS[f.suffix.lower()] for f in files}
    if not files:
        raise UserError(f"{key} {path}: no data files in the folder (looked for {', '.join(_KINDS)})")
    if len(kinds) > 1:
        raise UserError(f"{key} {path}: the folder mixes {', '.join(sorted(kinds))} files; keep one kind per folder")
    return files, kinds.pop()


def _json_kind(path: Path) -> str:
    """.json holds either one JSON array or one object per line."""
    with _reading(path), path.open("rb") as f:
        head = f.read(4096).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """An unreadable input (permissions, I/O error) as one line naming it."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the file and its permissions") from None


def total_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def iter_chunks(files: list[Path], kind: str, max_record_bytes: int, chunk_bytes: int = 1 << 20,
                chunk_records: int = 2048) -> Iterator[tuple[list, int]]:
    """Chunks of (location, raw) items and the input bytes they cover (0 where unknown)."""
    for f in files:
        source = _lines(f, kind, max_record_bytes) if kind in ("jsonl", "txt") else _records(f, kind)
        chunk, size = [], 0
        for loc, raw, nbytes in source:
            chunk.append((loc, raw))
            size += nbytes
            if len(chunk) >= chunk_records or size >= chunk_bytes:
                yield chunk, size
                chunk, size = [], 0
        if chunk:
            yield chunk, size


def _lines(path: Path, kind: str, limit: int):
    with _reading(path), path.open("rb") as f:
        lineno = 0
        while line := f.readline(limit + 1):
            lineno += 1
            if len(line) > limit and not line.endswith(b"\n"):
                nbytes = len(line)
                while not line.endswith(b"\n") and (line := f.readline(SKIP_BYTES)):
                    nbytes += len(line)
                yield f"{path}:{lineno}", TooLarge(nbytes), nbytes
                continue
            if not line.strip():
                # blank lines separate records; they hold no data
                continue
            if kind == "txt":
                try:
                    text = line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
                yield f"{path}:{lineno}", text, len(line)
            else:
                yield f"{path}:{lineno}", line, len(line)


def _records(path: Path, kind: str):
    import datasets

    datasets.disable_progress_bars()
    builder = "json" if kind == "json" else kind
    i = 0
    try:
        ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        for i, rec in enumerate(ds, start=1):
            yield f"{path}: record {i}", rec, 0
    except UserError:
        raise
    except Exception as e:  # datasets/pyarrow parse errors come in many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: record {i + 1}: cannot read as {kind} ({first})") from None
