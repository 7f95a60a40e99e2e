"""Streaming writer of Megatron indexed datasets (SPEC.md section 5), byte-identical to
megatron-core's IndexedDatasetBuilder, plus the all-or-nothing output set.

Why not IndexedDatasetBuilder itself: it keeps one Python int per sequence and wants a torch tensor
per item; this writer takes whole numpy chunks (thousands of sequences per call) and keeps lengths
as int32 arrays, so memory stays small and the main process stays fast. Tests compare both byte for byte.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
                np.uint16: 8}


def optimal_dtype(vocab_size: int) -> type:
    """The dtype megatron's tools/preprocess_data.py picks (DType.optimal_dtype)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedWriter:
    """Writes `<path>.bin` and `<path>.idx`; each sequence written here is one document (as megatron's
    tools/preprocess_data.py does for one-sentence documents)."""

    def __init__(self, bin_path: Path, idx_path: Path, dtype: type):
        self.bin_path, self.idx_path, self.dtype = bin_path, idx_path, dtype
        self._bin = open(bin_path, "wb", buffering=1 << 22)
        self._lengths: list[np.ndarray] = []  # int32 chunks
        self.tokens = self.sequences = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append len(lengths) documents, their tokens concatenated in `tokens`."""
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        self._bin.write(tokens.tobytes(order="C"))
        lengths = np.asarray(lengths, dtype=np.int32)
        self._lengths.append(lengths)
        self.tokens += int(tokens.size)
        self.sequences += len(lengths)

    def close(self) -> None:
        """Finish .bin and write .idx exactly as megatron-core's _IndexWriter does (chunk by chunk, so no
        per-sequence array bigger than the length chunks is ever built)."""
        self._bin.close()
        n = sum(len(c) for c in self._lengths)
        itemsize = np.dtype(self.dtype).itemsize
        with open(self.idx_path, "wb", buffering=1 << 22) as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))  # document k ends after sequence k
            for chunk in self._lengths:
                f.write(chunk.tobytes(order="C"))
            offset = 0
            for chunk in self._lengths:
                ends = offset + np.cumsum(chunk.astype(np.int64) * itemsize)
                f.write((ends - chunk.astype(np.int64) * itemsize).tobytes(order="C"))
                offset = int(ends[-1]) if len(ends) else offset
            for start in range(0, n + 1, 1 << 20):
                f.write(np.arange(start, min(n + 1, start + (1 << 20)), dtype=np.int64).tobytes(order="C"))

    def abort(self) -> None:
        try:
            self._bin.close()
        except OSError:  # flushing what a full disk refused fails again; the file is removed anyway
            pass


class OutputSet:
    """Several indexed datasets written under temporary names and renamed only when all are complete,
    so an interrupted or failed run never leaves files that look finished (and never touches old ones)."""

    def __init__(self, prefixes: list[str], dtype: type):
        self.final = [Path(p) for p in prefixes]
        self._created_dir = None
        parent = self.final[0].parent
        try:
            parent.mkdir(parents=True)
            self._created_dir = parent
        except FileExistsError:  # already there (or made just now by another node sharing the folder)
            pass
        # host and pid: nodes sharing an output_dir (container pids repeat across nodes) never collide
        tag = f".tmp-{socket.gethostname()}-{os.getpid()}"
        self.done: list[Path] = []  # final files renamed into place by commit()
        self.writers = [
            IndexedWriter(Path(f"{p}.bin{tag}"), Path(f"{p}.idx{tag}"), dtype) for p in self.final
        ]

    def commit(self) -> list[Path]:
        for w in self.writers:
            w.close()
        self.done = done = []
        # .bin before .idx: a reader that finds an .idx can trust its .bin
        for w, p in zip(self.writers, self.final):
            os.replace(w.bin_path, f"{p}.bin")
            done.append(Path(f"{p}.bin"))
        for w, p in zip(self.writers, self.final):
            os.replace(w.idx_path, f"{p}.idx")
            done.append(Path(f"{p}.idx"))
        return done

    def abort(self) -> None:
        """Removes the temporary files, and what commit() renamed into place when the caller failed after it."""
        for w in self.writers:
            w.abort()
            for path in (w.bin_path, w.idx_path):
                path.unlink(missing_ok=True)
        for path in self.done:
            path.unlink(missing_ok=True)
        if self._created_dir is not None:
            try:
                self._created_dir.rmdir()
            except OSError:
                pass
