"""Preprocessing speed and memory: ours vs the per-document worker-pool approach of Megatron-LM's
tools/preprocess_data.py (pretraining) and of per-sample template tokenization (instruction data),
measured in the same run on the same inputs, with peak RSS of each process tree.

Inputs are built offline: a Qwen2-shaped 151,646-token byte-level BPE trained by the tokenizers library
(build_tokenizer), and a text + code corpus from this Python's own standard library sources.

Start-up first: wall time of `preprocess` on a one-record file (an upper bound for command -> first record
read), with the tokenizer cache empty (first load: transformers) and filled (later loads: tokenizers alone),
next to transformers' AutoTokenizer.from_pretrained alone; medians of --repeats runs.

    pip install gigatoken awkward         # optional: the fast pretraining encoder (verified against HF)
    python benchmarks/preprocess.py                     # 50 MB pretraining + 10 MB instruction data
    python benchmarks/preprocess.py --mb 200 --sft-mb 20 --workers 2
    python benchmarks/preprocess.py --startup-only --repeats 5

Prints one row per variant (seconds, tokens, tokens/s, peak RSS) and the ratio to the baseline, and says
whether our pretraining output is byte-identical to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SYSTEM = "You are a helpful assistant."


# ---------------------------------------------------------------- inputs

def build_tokenizer(out: Path) -> Path:
    """A Qwen2-shaped byte-level BPE with Qwen's vocabulary size (151,643 BPE tokens + 3 specials), trained offline
    by the tokenizers library on this Python's standard library (about 2-3 minutes, cached in --work): Qwen's
    pre-tokenizer split pattern and NFC normalizer, its special tokens, chat template and tokenizer class
    (Qwen2Tokenizer, which transformers rebuilds from the vocabulary and merges, as it does for Qwen's own)."""
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ascendfactory.tiny import QWEN_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator((text for _, text in _stdlib_sources()), trainers.BpeTrainer(
        vocab_size=151643, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(str(out))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}, indent=2))
    return out


def _stdlib_sources():
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield f.relative_to(root), text


def _write_jsonl(path: Path, mb: float, records) -> Path:
    """jsonl of `records()` (started again while needed) up to `mb` MB; an existing file is reused."""
    if path.exists():
        return path
    size, target = 0, mb * 1e6
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            for rec in records():
                line = json.dumps(rec) + "\n"
                f.write(line)
                size += len(line)
                if size >= target:
                    return path
    return path


def build_corpus(path: Path, mb: float) -> Path:
    """jsonl {"text": <one stdlib source file>} up to `mb` MB (the sources repeat if needed)."""
    return _write_jsonl(path, mb, lambda: ({"text": text} for _, text in _stdlib_sources()))


def _instruction_records():
    """Explain the first half of a code piece, answer with the second."""
    for name, text in _stdlib_sources():
        for start in range(0, len(text) - 400, 2400):
            piece = text[start:start + 2400]
            cut = len(piece) // 2
            yield {"instruction": f"Explain what this code from {name} does, then continue it.",
                   "input": piece[:cut], "output": piece[cut:]}


def build_instructions(path: Path, mb: float) -> Path:
    """alpaca jsonl from stdlib sources (see _instruction_records) up to `mb` MB."""
    return _write_jsonl(path, mb, _instruction_records)


# ---------------------------------------------------------------- baselines (run as child processes)

class _Baseline:
    """Per-document / per-sample tokenizer calls in a worker pool, as tools/preprocess_data.py does."""

    tokenizer = None

    def __init__(self, tokenizer_dir):
        self.tokenizer_dir = tokenizer_dir

    def initializer(self):
        from transformers import AutoTokenizer

        _Baseline.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def encode_document(self, line):
        tok = _Baseline.tokenizer
        ids = tok(json.loads(line)["text"]).input_ids
        return ids + [tok.eos_token_id]

    def encode_sample(self, line):
        # MindSpeed-style: each template segment tokenized on its own, labels from the segment kinds
        tok = _Baseline.tokenizer
        rec = json.loads(line)
        user = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
        segments = [(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                     "<|im_start|>assistant\n", False), (rec["output"] + "<|im_end|>", True), ("\n", False)]
        ids, labels = [], []
        for text, supervised in segments:
            seg = tok.encode(text, add_special_tokens=False)
            ids += seg
            labels += seg if supervised else [-100] * len(seg)
        return ids, labels


def baseline(kind, src, tokenizer_dir, prefix, workers):
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    enc = _Baseline(tokenizer_dir)
    start = time.monotonic()
    with open(src, encoding="utf-8") as fin, multiprocessing.Pool(workers, initializer=enc.initializer) as pool:
        if kind == "pretrain":
            builder = IndexedDatasetBuilder(f"{prefix}_text_document.bin", dtype=DType.optimal_dtype(vocab))
            for ids in pool.imap(enc.encode_document, fin, 32):
                builder.add_document(torch.IntTensor(ids), [len(ids)])
            builder.finalize(f"{prefix}_text_document.idx")
        else:
            builders = {s: IndexedDatasetBuilder(f"{prefix}_packed_{s}_document.bin", dtype=np.int32)
                        for s in ("input_ids", "attention_mask", "labels")}
            for ids, labels in pool.imap(enc.encode_sample, fin, 32):
                for s, v in (("input_ids", ids), ("attention_mask", [1] * len(ids)), ("labels", labels)):
                    builders[s].add_document(torch.IntTensor(v), [len(v)])
            for s, b in builders.items():
                b.finalize(f"{prefix}_packed_{s}_document.idx")
    print(json.dumps({"seconds": time.monotonic() - start}))


# ---------------------------------------------------------------- measuring

def _tree_rss(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds, peak RSS of its process tree, and its own processing seconds if it reports them."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    peak = [0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=poll)
    t.start()
    out, err = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    seconds = None
    for line in (out + err).splitlines():
        if line.startswith("{"):
            seconds = json.loads(line)["seconds"]
        elif line.startswith("preprocess done:"):
            seconds = float(line.split("seconds ")[1].split(",")[0])
    return {"wall": time.monotonic() - start, "seconds": seconds, "peak_rss": peak[0], "log": err}


def idx_tokens(idx: Path) -> int:
    n = int(np.frombuffer(idx.read_bytes()[18:26], dtype=np.uint64)[0])
    return int(np.fromfile(idx, dtype=np.int32, count=n, offset=34).sum())


def check_instruction_output(ours: Path, base: Path, src: Path, tok: Path, every: int = 25) -> None:
    """Ours must equal apply_chat_template token for token; the per-segment baseline differs where a reply
    starts with whitespace that whole-text tokenization merges with the header's newline."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok))
    o, b = IndexedDataset(f"{ours}_packed_input_ids_document"), IndexedDataset(f"{base}_packed_input_ids_document")
    differ = sum(not np.array_equal(o[i], b[i]) for i in range(len(o)))
    wrong = 0
    with src.open() as f:
        for i, line in enumerate(f):
            if i % every == 0:
                r = json.loads(line)
                msgs = [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                        {"role": "assistant", "content": r["output"]}]
                wrong += hf.apply_chat_template(msgs, tokenize=True)["input_ids"] != o[i].tolist()
    print(f"  samples != apply_chat_template (every {every}th checked): {wrong}; samples that differ from the "
          f"per-segment baseline: {differ} of {len(o)}")


def startup(cli: list[str], tok: Path, work: Path, repeats: int) -> None:
    import shutil
    import statistics

    one = work / "one-record.jsonl"
    one.write_text(json.dumps({"text": "The first record."}) + "\n")
    cmd = cli + ["--input", str(one), "--output-prefix", str(work / "out" / "one"), "--overwrite"]
    cache = work / "tokenizer-cache"
    load = [sys.executable, "-c", "import sys, time; t = time.monotonic(); from transformers import AutoTokenizer; "
            "AutoTokenizer.from_pretrained(sys.argv[1]); print(time.monotonic() - t)", str(tok)]
    rows = {"transformers AutoTokenizer.from_pretrained alone (import included)": [],
            "ours, tokenizer cache empty (first run)": [], "ours, tokenizer cache filled (every later run)": []}
    for _ in range(repeats):
        rows["transformers AutoTokenizer.from_pretrained alone (import included)"].append(
            float(subprocess.run(load, capture_output=True, text=True, check=True).stdout.split()[-1]))
        shutil.rmtree(cache, ignore_errors=True)
        for name in list(rows)[1:]:
            rows[name].append(measure(cmd, {"ASCENDFACTORY_TOKENIZER_CACHE": str(cache)})["wall"])
    print(f"start-up: preprocess of one record, wall seconds (median of {repeats}; min-max)")
    for name, times in rows.items():
        print(f"  {name:<70} {statistics.median(times):6.2f} s  ({min(times):.2f}-{max(times):.2f})")
    m = measure([sys.executable, "-X", "importtime", *cmd[1:]], {"ASCENDFACTORY_TOKENIZER_CACHE": str(cache)})
    heavy = sorted({line.split("|")[-1].strip().split(".")[0] for line in m["log"].splitlines()
                    if line.startswith("import time:")} & {"torch", "transformers", "megatron"})
    print(f"  modules imported by a cached start (-X importtime): torch / transformers / megatron: {heavy or 'none'}")


def _row(name, m, tokens, base=None):
    rate = tokens / m["seconds"]
    ratio = f"{rate / (base['tokens'] / base['seconds']):6.2f}x" if base else "   1.00x"
    print(f"{name:<52} {m['seconds']:7.2f} s {m['wall']:7.2f} s {tokens / 1e6:8.2f} M {rate / 1e6:7.2f} M/s "
          f"{m['peak_rss'] / 2**20:8.0f} MB  {ratio}")
    return {**m, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50, help="pretraining corpus size")
    ap.add_argument("--sft-mb", type=float, default=10, help="instruction data size")
    ap.add_argument("--workers", type=int, default=2, help="baseline pool size (and ours with --ours-workers)")
    ap.add_argument("--ours-workers", type=int, default=1)
    ap.add_argument("--work", default="/tmp/ascendfactory-bench", help="inputs are cached here")
    ap.add_argument("--repeats", type=int, default=3, help="start-up runs (medians are reported)")
    ap.add_argument("--startup-only", action="store_true", help="measure only the start-up")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(work / "qwen2-151k-tokenizer")
    out = work / "out"
    out.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "ascendfactory", "preprocess", "--tokenizer-name-or-path", str(tok),
           "--workers", str(args.ours_workers)]
    startup(cli, tok, work, args.repeats)
    if args.startup_only:
        return
    corpus = build_corpus(work / f"stdlib-{args.mb:g}mb.jsonl", args.mb)
    sft = build_instructions(work / f"alpaca-{args.sft_mb:g}mb.jsonl", args.sft_mb)
    me = [sys.executable, __file__]
    cache = {"ASCENDFACTORY_TOKENIZER_CACHE": str(work / "tokenizer-cache")}  # filled by startup()
    print(f"cpus {os.cpu_count()}, pretraining {corpus.stat().st_size / 1e6:.0f} MB, instruction "
          f"{sft.stat().st_size / 1e6:.0f} MB, tokenizer vocabulary 151646")
    print(f"{'variant':<52} {'work':>9} {'wall':>9} {'tokens':>10} {'tokens/s':>11} {'peak RSS':>11}  ratio")

    m = measure(me + ["_baseline", "pretrain", str(corpus), str(tok), str(out / "base"), str(args.workers)])
    base = _row(f"baseline pretrain (pool of {args.workers}, per document)", m,
                idx_tokens(out / "base_text_document.idx"))
    pretrain = [str(corpus), "--handler-name", "GeneralPretrainHandler", "--append-eod"]
    for name, env in (("ours pretrain (tokenizers encode_batch_fast)", {"ASCENDFACTORY_GIGATOKEN": "0"}),
                      ("ours pretrain (gigatoken, verified)", {})):
        m = measure(cli + ["--input", *pretrain[:1], "--output-prefix", str(out / "ours"), *pretrain[1:]],
                    {**cache, **env})
        if "encoder gigatoken" not in m["log"] and not env:
            print("  (gigatoken not installed or not usable: pip install gigatoken awkward)")
        _row(name, m, idx_tokens(out / "ours_text_document.idx"), base)
        same = all((out / f"ours_text_document.{e}").read_bytes() == (out / f"base_text_document.{e}").read_bytes()
                   for e in ("bin", "idx"))
        print(f"  byte-identical to the baseline: {same}")

    m = measure(me + ["_baseline", "sft", str(sft), str(tok), str(out / "sbase"), str(args.workers)])
    sbase = _row(f"baseline instruction (pool of {args.workers}, per sample)", m,
                 idx_tokens(out / "sbase_packed_input_ids_document.idx"))
    for prompt_type, engine, env in (("qwen", "tokenizers", {"ASCENDFACTORY_GIGATOKEN": "0"}),
                                     ("qwen", "gigatoken", {}), ("auto", "gigatoken", {})):
        m = measure(cli + ["--input", str(sft), "--output-prefix", str(out / "sours"), "--handler-name",
                           "AlpacaStyleInstructionHandler", "--prompt-type", prompt_type, "--seq-length", "8192"],
                    {**cache, **env})
        _row(f"ours instruction (--prompt-type {prompt_type}, {engine})", m,
             idx_tokens(out / "sours_packed_input_ids_document.idx"), sbase)
        check_instruction_output(out / "sours", out / "sbase", sft, tok)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_baseline":
        baseline(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        main()
