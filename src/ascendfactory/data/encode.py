"""Chunk encoders: a chunk of raw records -> token arrays. They run in the main process or in worker
processes (same code), batch-encoding a whole chunk in one call (fast_encode.TextEncoder).

Instruction samples are rendered to one text each and tokenized whole (so the ids equal
apply_chat_template's); the supervised character spans are then mapped to tokens: for byte-level BPE
tokenizers by summing each token's byte length (vectorized), otherwise from the tokenizer's character
offsets. A token that overlaps a supervised span is supervised.

A chunk is a list of (location, raw) with raw a JSON line (bytes), a text line (str), a record (dict) or
readers.TooLarge. Records over the limit (max_record_bytes: the line, or the text to tokenize of a record from
parquet/csv/arrow/a JSON array) are bad records: tokenizing one huge text takes minutes and gigabytes.
Results carry their tokens concatenated in numpy arrays, so shipping them between processes is cheap.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from ascendfactory.config.schema import PRETRAIN
from ascendfactory.data.fast_encode import TextEncoder
from ascendfactory.data.handlers import BadRecord, pretrain_texts, to_conversation
from ascendfactory.data.readers import TooLarge
from ascendfactory.data.templates import Renderer
from ascendfactory.data.tokenizer import TokenizerInfo

IGNORE_INDEX = -100


@dataclass
class Job:
    """Everything a worker needs; picklable."""

    handler: str
    tok: TokenizerInfo
    seq_length: int
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    encoder: TextEncoder | None = None
    token_bytes: tuple | None = None  # instruction data with a byte-level BPE: tokenizer.byte_level_token_lengths
    keys: dict = field(default_factory=dict)  # instruction column/role names
    renderer: Renderer | None = None
    max_record_bytes: int | None = None  # None: no limit (preprocess_command always sets one)
    max_record_key: str = ""  # how the limit's message names it: the flag, or the YAML key under `train`


@dataclass
class PretrainChunk:
    records: int
    tokens: list[np.ndarray]  # one concatenated array per json key
    lengths: list[np.ndarray]
    bad: list[tuple[str, str]]


@dataclass
class InstructionChunk:
    records: int
    ids: np.ndarray  # all samples concatenated (int32)
    labels: np.ndarray
    lengths: np.ndarray
    truncated: int
    bad: list[tuple[str, str]]


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def _too_large(nbytes: int, job: Job) -> BadRecord:
    return BadRecord(f"record of {_mb(nbytes)}, over the limit of {_mb(job.max_record_bytes)} "
                     f"({job.max_record_key})")


def _check_size(texts: list[str], job: Job) -> None:
    """Texts about to be tokenized; UTF-8 sizes are only computed when the character count could exceed it."""
    limit = job.max_record_bytes
    if limit is not None and sum(map(len, texts)) * 4 > limit:
        nbytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if nbytes > limit:
            raise _too_large(nbytes, job)


def _record(raw, job: Job) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        return {"text": raw}
    if isinstance(raw, TooLarge):
        raise _too_large(raw.nbytes, job)
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecord(f"not valid JSON ({getattr(e, 'msg', e)})") from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply") from None
    if not isinstance(rec, dict):
        raise BadRecord(f"a JSON {type(rec).__name__}, not an object")
    return rec


def encode_chunk(job: Job, chunk: list) -> PretrainChunk | InstructionChunk:
    return (_encode_pretrain if job.handler == PRETRAIN else _encode_instruction)(job, chunk)


def _encode_pretrain(job: Job, chunk: list) -> PretrainChunk:
    columns: list[list[str]] = [[] for _ in job.json_keys]
    bad = []
    for loc, raw in chunk:
        try:
            texts = pretrain_texts(_record(raw, job), job.json_keys)
            _check_size(texts, job)
        except BadRecord as e:
            bad.append((loc, str(e)))
            continue
        for col, text in zip(columns, texts):
            col.append(text)
    encoded = [job.encoder.encode(col) for col in columns]
    return PretrainChunk(len(chunk) - len(bad), [t for t, _ in encoded], [n for _, n in encoded], bad)


def _spans_by_offsets(enc, spans) -> list[tuple[int, int]]:
    """Token ranges [a, b) of the tokens that overlap each character span, from the tokenizer's offsets."""
    out = []
    for start, end in spans:
        a = next((t for c in range(start, end) if (t := enc.char_to_token(c)) is not None), None)
        if a is not None:
            b = next(t for c in range(end - 1, start - 1, -1) if (t := enc.char_to_token(c)) is not None)
            # char_to_token names the first of the tokens sharing a character (SentencePiece's byte fallback
            # spells one character as several byte tokens): take the rest of them too
            while b + 1 < len(enc.offsets) and enc.offsets[b + 1][0] < end:
                b += 1
            out.append((a, b + 1))
    return out


def _spans_by_bytes(ids: np.ndarray, text: str, spans, token_bytes) -> list[tuple[int, int]] | None:
    """The same ranges from each token's byte length (byte-level BPE), or None when the bytes do not add up."""
    lengths, nfc = token_bytes
    ascii_text = text.isascii()
    if nfc and not ascii_text and not unicodedata.is_normalized("NFC", text):
        return None
    ends = np.cumsum(lengths[ids])
    size = len(text) if ascii_text else len(text.encode("utf-8"))
    if len(ends) == 0 or ends[-1] != size:
        return None

    def byte_pos(c):
        return c if ascii_text else len(text[:c].encode("utf-8"))

    # token i covers bytes [ends[i-1], ends[i]); it overlaps [s, e) when ends[i] > s and ends[i-1] < e
    return [(int(np.searchsorted(ends, byte_pos(s), "right")), int(np.searchsorted(ends, byte_pos(e), "left")) + 1)
            for s, e in spans]


def _encode_instruction(job: Job, chunk: list) -> InstructionChunk:
    texts, spans, bad = [], [], []
    for loc, raw in chunk:
        try:
            text, sp = job.renderer.render(to_conversation(job.handler, _record(raw, job), job.keys))
            _check_size([text], job)
        except BadRecord as e:
            bad.append((loc, str(e)))
            continue
        texts.append(text)
        spans.append(sp)
    # the templates spell out every special token, so the tokenizer must not add its own
    if job.token_bytes is None:
        encs = job.tok.backend.encode_batch(texts, add_special_tokens=False)
        samples = [(np.asarray(e.ids, dtype=np.int32), _spans_by_offsets(e, sp)) for e, sp in zip(encs, spans)]
    else:
        tokens, counts = job.encoder.encode(texts)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        samples = []
        for a, b, text, sp in zip(bounds[:-1], bounds[1:], texts, spans):
            ids = tokens[a:b]
            token_spans = _spans_by_bytes(ids, text, sp, job.token_bytes)
            if token_spans is None:  # e.g. text the normalizer changes
                enc = job.tok.backend.encode(text, add_special_tokens=False)
                ids, token_spans = np.asarray(enc.ids, dtype=np.int32), _spans_by_offsets(enc, sp)
            samples.append((ids, token_spans))
    ids_out, labels_out, truncated = [], [], 0
    for ids, token_spans in samples:
        labels = np.full_like(ids, IGNORE_INDEX)
        for a, b in token_spans:
            labels[a:b] = ids[a:b]
        if len(ids) > job.seq_length:
            keep = truncation_keep(len(ids), token_spans, job.seq_length)
            ids, labels = ids[keep], labels[keep]
            truncated += 1
        ids_out.append(ids)
        labels_out.append(labels)
    lengths = np.fromiter(map(len, ids_out), dtype=np.int32, count=len(ids_out))
    return InstructionChunk(len(texts), _concat(ids_out), _concat(labels_out), lengths, truncated, bad)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def truncation_keep(n: int, spans: list[tuple[int, int]], limit: int) -> np.ndarray:
    """Indices of the tokens kept when a sample of n tokens must fit in `limit`.

    Whole turns (prompt part + supervised reply) are kept while they fit. In the turn that does not fit,
    the remaining budget is split between its prompt and its reply in proportion to their lengths: the
    prompt keeps its beginning, the reply its beginning and its last token (the end-of-turn token, so
    the model still learns to stop). Later turns are dropped.
    """
    keep, budget, pos = [], limit, 0
    for a, b in list(spans) + [(n, n)]:
        p_len, r_len = a - pos, b - a
        if p_len + r_len <= budget:
            keep.append(np.arange(pos, b))
            budget -= p_len + r_len
            pos = b
            continue
        if budget > 0:
            r = min(r_len, budget, max(1, round(budget * r_len / (p_len + r_len)))) if r_len else 0
            p = min(p_len, budget - r)
            r = budget - p if r_len else 0  # give back what the prompt could not use
            keep.append(np.arange(pos, pos + p))
            if r:
                keep.append(np.arange(a, a + r - 1))
                keep.append(np.array([b - 1]))
        break
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)
