"""Raw dataset -> Megatron indexed datasets: the `preprocess` command and the `train` stage's work.

Outputs (megatron-core IndexedDataset format, SPEC.md section 5, one sequence per document):

* GeneralPretrainHandler: `<prefix>_<key>_document.{bin,idx}` per --json-keys key (default
  `<prefix>_text_document`): each document = tokenizer(text).input_ids (the tokenizer's own special
  tokens included), plus the EOS id with --append-eod. dtype uint16 below 65500 ids, else int32
  (megatron's DType.optimal_dtype).
* Instruction handlers: three int32 datasets with the same sequence lengths:
  `<prefix>_packed_input_ids_document`, `<prefix>_packed_attention_mask_document`,
  `<prefix>_packed_labels_document`. Labels are NOT shifted (labels[i] = input_ids[i] on supervised
  tokens, -100 elsewhere; the loss shifts). Supervised = every assistant reply and the end-of-turn/EOS
  token closing it.
  - without --pack: one sequence per sample, unpadded; samples longer than --seq-length are truncated
    (see encode.truncation_keep) and counted; attention_mask is all 1.
  - with --pack: whole samples packed greedily into bins of exactly --seq-length tokens, padded with the
    tokenizer's pad id (EOS id when it has none; labels -100, attention_mask 0). attention_mask holds k
    on the tokens of the k-th sample of the bin (1, 2, 3, ...), so training can reset position ids and
    attention at sample boundaries.

Files are written under temporary names and renamed when all are complete; on any error (a full disk
included) they are removed and nothing existing is touched. A `<prefix>_preprocess_summary.json` (fingerprint +
counts) is written last. Existing outputs of the prefix are never replaced unless they carry the summary of
this very preprocessing (same inputs and options) or --overwrite is given (`train` gives it for its own folder).

Records over max_record_mb (default 16 MB) are bad records, read no further than the limit (encode.py).

Speed and memory: input is streamed in chunks (about 1 MB or 2048 records); each chunk is encoded in one
batch call (fast_encode: HF tokenizers, or gigatoken when installed and verified); with --workers N > 1
chunks go to N forked processes, at most 2N chunks in flight. Packing holds a window of PACK_WINDOW samples.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from ascendfactory.config.schema import PRETRAIN
from ascendfactory.data import outputs as out
from ascendfactory.data.encode import InstructionChunk, Job, PretrainChunk, encode_chunk
from ascendfactory.data.fast_encode import TextEncoder
from ascendfactory.data.handlers import parse_map_keys
from ascendfactory.data.indexed import OutputSet, optimal_dtype
from ascendfactory.data.names import FLAGS
from ascendfactory.data.packing import PACK_WINDOW, build_bin, pack_window
from ascendfactory.data.readers import discover, iter_chunks, total_bytes
from ascendfactory.data.templates import Renderer
from ascendfactory.data.tokenizer import byte_level_token_lengths, load_tokenizer
from ascendfactory.errors import UserError, disk_full_as_error, is_disk_full
from ascendfactory.progress import Progress

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
SHOWN_SKIPS = 5


def preprocess_command(input, tokenizer_name_or_path, output_prefix, handler_name, prompt_type, seq_length, pack,
                       append_eod, json_keys, map_keys, workers, skip_bad_records,
                       max_record_mb: float, overwrite: bool = False, names: dict = FLAGS) -> dict:
    """The `preprocess` command; returns the summary (also printed). names: how messages name the options
    (data.names: the flags, or the YAML keys under `train`)."""
    if seq_length < 1:
        raise UserError(f"{names['seq_length']} {seq_length}: must be at least 1")
    if workers < 1:
        raise UserError(f"{names['workers']} {workers}: must be at least 1")
    if not 0 < max_record_mb < float("inf"):
        raise UserError(f"{names['max_record_mb']} {max_record_mb}: must be a number above 0")
    if not json_keys:
        raise UserError(f"{names['json_keys']}: give at least one column name")
    keys = parse_map_keys(handler_name, map_keys, names)
    opts = out.options(handler_name, prompt_type, seq_length, pack, append_eod, json_keys, map_keys, skip_bad_records,
                       max_record_mb)
    files, kind = discover(input, names["input"])
    stamp = out.fingerprint(files, tokenizer_name_or_path, opts)
    if not overwrite:
        _refuse_foreign_outputs(output_prefix, handler_name, json_keys, stamp)
    tok = load_tokenizer(tokenizer_name_or_path, names["tokenizer"])

    job = make_job(handler_name, tokenizer_name_or_path, tok, prompt_type, seq_length, json_keys, append_eod, keys,
                   names)
    job.max_record_bytes, job.max_record_key = int(max_record_mb * 2**20), names["max_record_mb"]
    dtype = optimal_dtype(tok.vocab_size) if handler_name == PRETRAIN else np.int32
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if pack and handler_name != PRETRAIN and pad_id is None:
        raise UserError(f"{tokenizer_name_or_path}: {names['pack']} needs a pad_token or eos_token; the tokenizer "
                        "has neither")

    with disk_full_as_error(f"{output_prefix}_*"):
        outputs = _output_set(output_prefix, handler_name, json_keys, dtype)
        try:
            summary = _run(job, files, kind, outputs, pack, pad_id, workers, skip_bad_records, names)
            out.summary_path(output_prefix).unlink(missing_ok=True)  # never describe outputs it did not write
            written = outputs.commit()
            summary["output_bytes"] = sum(p.stat().st_size for p in written)
            if job.encoder is not None:
                summary["encoder"] = job.encoder.engine
            prefix = out.data_prefix(output_prefix, handler_name, json_keys)
            out.write_summary(output_prefix, {"fingerprint": stamp, "data_prefix": prefix,
                                              "outputs": [str(p) for p in written], "summary": summary})
        except BaseException:
            outputs.abort()  # also removes outputs committed just before a failed summary: no summary, no outputs
            raise
    log.info("preprocess done: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + f"; data prefix {prefix}")
    return summary


def _refuse_foreign_outputs(output_prefix, handler, json_keys, stamp: dict) -> None:
    """Outputs of the prefix that this preprocessing did not write (other data, options, or tools) are the
    user's: refused before any work."""
    found = out.existing_outputs(output_prefix, handler, json_keys)
    done = out.read_summary(output_prefix)
    if found and (done is None or done.get("fingerprint") != stamp):
        raise UserError(f"--output-prefix {output_prefix}: {found[0]} already exists and holds other "
                        "data; choose another prefix, or pass --overwrite to replace it")


def _output_set(output_prefix, handler, json_keys, dtype) -> OutputSet:
    try:
        return OutputSet(out.output_prefixes(output_prefix, handler, json_keys), dtype)
    except OSError as e:  # permissions, a read-only file system, a file where a folder should be
        if is_disk_full(e):
            raise
        raise UserError(f"{output_prefix}: cannot write there ({e.strerror}); choose a writable folder") from None


def make_job(handler, tokenizer_path, tok, prompt_type, seq_length, json_keys, append_eod, keys,
             names: dict = FLAGS) -> Job:
    job = Job(handler=handler, tok=tok, seq_length=seq_length, json_keys=list(json_keys), keys=keys)
    if handler == PRETRAIN:
        if append_eod and tok.eos_id is None:
            raise UserError(f"{tokenizer_path}: {names['append_eod']} needs an eos_token; the tokenizer has none")
        job.encoder = TextEncoder(tok.backend, tokenizer_path, eod=tok.eos_id if append_eod else None)
    else:
        job.renderer = Renderer(handler, prompt_type, tok, tokenizer_path, names)
        job.token_bytes = byte_level_token_lengths(tok.backend)
        if job.token_bytes is not None:
            job.encoder = TextEncoder(tok.backend, tokenizer_path, special_tokens=False)
    return job


class _Progress(Progress):
    """Running totals, shown every PROGRESS_EVERY_S seconds."""

    def __init__(self, total_bytes: int):
        super().__init__("preprocess", PROGRESS_EVERY_S)
        self.total = total_bytes
        self.records = self.tokens = self.bytes = 0

    def update(self, records: int, tokens: int, nbytes: int) -> None:
        self.records += records
        self.tokens += tokens
        self.bytes += nbytes
        if self.due():
            dt = self.elapsed()
            done = f"{100 * self.bytes / self.total:.0f}% of input, " if self.total and self.bytes else ""
            self.say(f"{done}{self.records} records, {self.tokens} tokens, {self.records / dt:.0f} records/s, "
                     f"{self.tokens / dt / 1e6:.2f}M tokens/s")


def _results(job: Job, chunks, workers: int):
    """encode_chunk over the chunks, in order; with workers > 1 in a process pool with a bounded number of
    chunks in flight (so memory does not grow with the input)."""
    if workers <= 1:
        for chunk, nbytes in chunks:
            yield encode_chunk(job, chunk), nbytes
        return
    import multiprocessing as mp

    # fork: workers inherit the loaded tokenizer instead of re-loading it
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque = deque()
        for chunk, nbytes in chunks:
            pending.append((pool.apply_async(_encode_in_worker, (chunk,)), nbytes))
            if len(pending) >= 2 * workers:
                res, n = pending.popleft()
                yield res.get(), n
        while pending:
            res, n = pending.popleft()
            yield res.get(), n


_WORKER_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _encode_in_worker(chunk):
    return encode_chunk(_WORKER_JOB, chunk)


def _run(job: Job, files, kind, outputs: OutputSet, pack: bool, pad_id, workers: int, skip_bad: bool,
         names: dict) -> dict:
    progress = _Progress(total_bytes(files) if kind in ("jsonl", "txt") else 0)
    skipped = truncated = 0
    window: list[tuple[np.ndarray, np.ndarray]] = []
    writers = outputs.writers
    for res, nbytes in _results(job, iter_chunks(files, kind, job.max_record_bytes), workers):
        for loc, msg in res.bad:
            if not skip_bad:
                raise UserError(f"{loc}: {msg} (fix the record or {names['skip_bad_records']})")
            skipped += 1
            if skipped <= SHOWN_SKIPS:
                log.info(f"preprocess: skipped {loc}: {msg}")
        if isinstance(res, PretrainChunk):
            for w, tokens, lengths in zip(writers, res.tokens, res.lengths):
                w.add_documents(tokens, lengths)
            progress.update(res.records, sum(len(t) for t in res.tokens), nbytes)
            continue
        assert isinstance(res, InstructionChunk)
        truncated += res.truncated
        progress.update(res.records, len(res.ids), nbytes)
        if not pack:
            writers[0].add_documents(res.ids, res.lengths)
            writers[1].add_documents(np.ones(len(res.ids), np.int32), res.lengths)
            writers[2].add_documents(res.labels, res.lengths)
            continue
        bounds = np.concatenate([[0], np.cumsum(res.lengths)])
        window += [(res.ids[a:b], res.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(window) >= PACK_WINDOW:
            _write_bins(writers, window, job.seq_length, pad_id)
            window = []
    if window:
        _write_bins(writers, window, job.seq_length, pad_id)
    if progress.records == 0:
        raise UserError(f"{files[0] if len(files) == 1 else files[0].parent}: no usable records"
                        + (f" ({skipped} skipped)" if skipped else ""))
    dt = progress.elapsed()
    return {"records": progress.records, "skipped": skipped, "truncated": truncated,
            "sequences": writers[0].sequences, "tokens": writers[0].tokens,
            "seconds": round(dt, 2), "tokens_per_s": round(progress.tokens / dt) if dt else 0}


def _write_bins(writers, samples, seq_length: int, pad_id: int) -> None:
    bins = pack_window([len(ids) for ids, _ in samples], seq_length)
    built = [build_bin([samples[i] for i in b], seq_length, pad_id) for b in bins]
    lengths = np.full(len(built), seq_length, dtype=np.int32)
    for stream, w in enumerate(writers):
        w.add_documents(np.concatenate([b[stream] for b in built]), lengths)
