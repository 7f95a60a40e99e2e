"""Texts -> token ids, exactly what the HF tokenizer gives (tokenizer(text).input_ids for pretraining
documents; encode(text, add_special_tokens=False) for rendered chat texts), as fast as the machine allows.

The HF fast tokenizer (`encode_batch_fast`, Rust, multi-threaded) is the reference and the fallback.
When the optional `gigatoken` package is installed (pip install gigatoken awkward) and can load the
tokenizer, it encodes instead (about 10-20x faster on byte-level BPE). Its output is verified against
the HF tokenizer: the first documents of the first chunk (VERIFY_FIRST_TOKENS tokens' worth), then every
VERIFY_EVERY-th document of every chunk; on any difference the chunk is re-encoded with HF and gigatoken
is dropped for the rest of the run. gigatoken does not run the
tokenizer's post-processor, so the special tokens it adds (e.g. Llama-3's BOS) are added here.
It is loaded at the first batch of at least GIGATOKEN_MIN_CHARS characters: importing it and building its tokenizer
cost more than HF's encoding of a small input (~0.7 s of a 1.5 s start). ASCENDFACTORY_GIGATOKEN=0 turns it off.
"""

from __future__ import annotations

import logging
import os
from itertools import chain

import numpy as np

log = logging.getLogger(__name__)

VERIFY_FIRST_TOKENS = 100_000
VERIFY_EVERY = 200
GIGATOKEN_MIN_CHARS = 256 << 10  # well under a chunk (about 1 MB), so every real corpus gets it


def _post_processor_ids(backend) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a single sequence (constant for BPE templates)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    raise ValueError("post-processor changes the text's own tokens")


def _load_gigatoken(backend, tokenizer_path: str):
    try:
        import awkward  # noqa: F401  (gigatoken's batch results are awkward arrays)
        import gigatoken
    except ImportError:
        return None
    try:
        # from the loaded tokenizer, not the folder: tokens added at load time (tokenizer_config) are included
        return gigatoken.Tokenizer(backend)
    except Exception as e:  # any tokenizer it does not support
        log.warning(f"preprocess: gigatoken cannot load {tokenizer_path} ({e}); using the HF tokenizer")
        return None


class TextEncoder:
    """Encodes batches of texts to (flat int32 tokens, lengths); picklable for worker processes.
    special_tokens: add the post-processor's special tokens (BOS...) as tokenizer(text) does."""

    def __init__(self, backend, tokenizer_path: str, special_tokens: bool = True, eod: int | None = None):
        self.hf = backend
        self.special_tokens = special_tokens
        self.eod = [] if eod is None else [eod]
        self.tokenizer_path = tokenizer_path
        self.giga = None
        self.giga_pending = os.environ.get("ASCENDFACTORY_GIGATOKEN", "1") != "0"  # loaded by the first large batch
        self.verified_tokens = 0
        self.prefix, self.suffix = [], []

    def _try_gigatoken(self) -> None:
        self.giga_pending = False
        self.giga = _load_gigatoken(self.hf, self.tokenizer_path)
        if self.giga is not None and self.special_tokens:
            try:
                self.prefix, self.suffix = _post_processor_ids(self.hf)
            except ValueError:
                self.giga = None

    @property
    def engine(self) -> str:
        return "gigatoken" if self.giga is not None else "tokenizers"

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.giga_pending and sum(map(len, texts)) >= GIGATOKEN_MIN_CHARS:
            self._try_gigatoken()
        if self.giga is not None:
            out = self._encode_gigatoken(texts)
            if out is not None:
                return out
        ids = [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=self.special_tokens)]
        if self.eod:
            ids = [x + self.eod for x in ids]
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths

    def _encode_gigatoken(self, texts: list[str]):
        import awkward as ak

        enc = self.giga.encode_batch(texts)
        counts = np.asarray(ak.num(enc), dtype=np.int64)
        flat = np.asarray(ak.flatten(enc)).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(texts)):
            if self.verified_tokens >= VERIFY_FIRST_TOKENS and i % VERIFY_EVERY:
                continue
            want = self.hf.encode(texts[i], add_special_tokens=self.special_tokens).ids
            got = self.prefix + flat[starts[i]:starts[i + 1]].tolist() + self.suffix
            if got != want:
                log.warning("preprocess: gigatoken differs from the HF tokenizer on a document; using the HF tokenizer")
                self.giga = None
                return None
            self.verified_tokens += len(want)
        extra = self.prefix + self.suffix + self.eod
        if not extra:
            return flat, counts.astype(np.int32)
        # splice the post-processor's ids and the EOD around every document
        lengths = counts + len(extra)
        out = np.empty(int(lengths.sum()), dtype=np.int32)
        out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        body = np.ones(len(out), dtype=bool)
        for j, tok in enumerate(self.prefix):
            out[out_starts + j] = tok
            body[out_starts + j] = False
        tail = self.suffix + self.eod
        ends = out_starts + lengths
        for j, tok in enumerate(tail):
            out[ends - len(tail) + j] = tok
            body[ends - len(tail) + j] = False
        out[body] = flat
        return out, lengths.astype(np.int32)
