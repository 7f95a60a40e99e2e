"""The validation set and when it is evaluated (SPEC.md section 10): its rules, checked before any stage, what
`plan` shows, and the sizes the trainer uses. No torch import: `plan` calls it."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from ascendfactory.errors import UserError

# Without eval_iters: the whole validation set when it fits in this many global batches, else this many.
DEFAULT_EVAL_BATCHES = 10


def interval(cfg) -> int:
    return cfg.eval_interval or cfg.save_interval


def parse_split(text: str) -> tuple[float, float, float]:
    """Megatron's "train,valid,test" weights ("98,2,0"; two numbers mean no test part)."""
    try:
        w = [float(x) for x in str(text).replace(" ", "").split(",")]
    except ValueError:
        w = []
    if len(w) == 2:
        w.append(0.0)
    if len(w) != 3 or min(w) < 0 or not all(map(math.isfinite, w)) or w[0] <= 0:
        raise UserError(f"split = {text!r}: expected train,valid,test weights with a training part, e.g. 98,2,0")
    return w[0], w[1], w[2]


def valid_fraction(cfg) -> float:
    """The share of the pretraining documents held out: val_size as a fraction, or split's valid weight."""
    if cfg.split:
        train, valid, test = parse_split(cfg.split)
        return valid / (train + valid + test)
    return cfg.val_size if 0 < cfg.val_size < 1 else 0.0


def has_validation(cfg) -> bool:
    return bool(cfg.val_size or (cfg.split and valid_fraction(cfg) > 0) or cfg.eval_dataset
                or cfg.eval_processed_data_dir)


def held_out_count(val_size: float, n: int, what: str = "samples") -> int:
    """How many of the n training samples val_size holds out; refused when none would remain for training."""
    k = int(val_size) if val_size >= 1 else max(1, round(val_size * n))
    if k >= n:
        raise UserError(f"val_size = {val_size}: holds out {k} of the {n} {what}, leaving no training data; "
                        "lower val_size")
    return k


def eval_batches(eval_iters: int | None, n: int, gbs: int) -> int:
    """Global batches per evaluation: never more than the set fills (its last one is padded with no-loss
    samples), by default the whole set when small."""
    whole = max(1, math.ceil(n / gbs))
    return min(eval_iters or min(whole, DEFAULT_EVAL_BATCHES), whole)


def problems(cfg) -> list[str]:
    """Each validation key's problem as one line naming the key and the fix."""
    out = []
    if isinstance(cfg.val_size, float) and cfg.val_size >= 1:
        out.append(f"val_size = {cfg.val_size}: a fraction must be below 1 (e.g. 0.05); a sample count is a whole "
                   "number (e.g. 100)")
    if cfg.split:
        if cfg.stage != "pt":
            out.append(f"split = {cfg.split!r}: pretraining only (stage pt); use val_size to hold out SFT samples")
        else:
            try:
                parse_split(cfg.split)
            except UserError as e:
                out.append(str(e))
    given = [k for k in ("val_size", "split", "eval_dataset", "eval_processed_data_dir") if getattr(cfg, k)]
    if len(given) > 1:
        out.append(f"{' and '.join(given)} each name a validation set; set one of them")
    if cfg.eval_dataset and not Path(cfg.eval_dataset).exists():
        out.append(f"eval_dataset: {cfg.eval_dataset} does not exist; give a data file or folder (json, jsonl, "
                   "parquet, csv, arrow, txt)")
    if cfg.eval_processed_data_dir and not Path(cfg.eval_processed_data_dir).exists():
        out.append(f"eval_processed_data_dir: {cfg.eval_processed_data_dir} does not exist; give the folder of the "
                   "preprocessed validation data")
    if cfg.export_checkpoint == "best" and not out and not has_validation(cfg):
        out.append("export_checkpoint = best needs a validation set; set val_size (or split, eval_dataset, "
                   "eval_processed_data_dir), or export_checkpoint: last")
    return out


def idx_sequences(idx_path: str | Path) -> int:
    """The sequence count from a Megatron .idx header (SPEC.md section 5), without reading the index."""
    with open(idx_path, "rb") as f:
        head = f.read(26)  # magic (9), version (8), dtype code (1), sequence count (8)
    if len(head) < 26 or not head.startswith(b"MMIDIDX"):
        raise UserError(f"{idx_path}: not a Megatron .idx file; preprocess the data again")
    return struct.unpack("<Q", head[18:26])[0]


def describe(cfg, data_prefix: str | None) -> dict:
    """What `plan` shows: where the validation set comes from, its size when the data is already there, and how
    often it is evaluated. Raises UserError when val_size would leave no training data."""
    if not has_validation(cfg):
        return {"source": None}
    every = interval(cfg)
    info = {"eval_interval": every, "eval_iters": cfg.eval_iters, "export_checkpoint": cfg.export_checkpoint}
    if cfg.eval_dataset or cfg.eval_processed_data_dir:
        key = "eval_dataset" if cfg.eval_dataset else "eval_processed_data_dir"
        return {"source": f"{key} {getattr(cfg, key)}", **info}
    if cfg.stage == "pt":
        key = "split" if cfg.split else "val_size"
        info["source"] = f"{100 * valid_fraction(cfg):g}% of the pretraining documents ({key})"
        return info
    info["source"] = f"val_size {cfg.val_size} of the training samples, drawn from seed {cfg.seed}"
    if data_prefix is not None:
        n = idx_sequences(f"{data_prefix}_packed_input_ids_document.idx")
        info["samples"] = held_out_count(cfg.val_size, n)
        info["train_samples"] = n - info["samples"]
        info["batches"] = eval_batches(cfg.eval_iters, info["samples"], cfg.global_batch_size)
    return info


def describe_line(info: dict) -> str:
    if info.get("source") is None:
        return "none (set val_size, split, eval_dataset or eval_processed_data_dir to evaluate while training)"
    size = (f"{info['samples']} samples held out, {info['train_samples']} left for training, "
            f"{info['batches']} global batch(es) per evaluation; " if "samples" in info else "")
    best = ", export the best" if info["export_checkpoint"] == "best" else ""
    return (f"{info['source']}: {size}evaluated at iteration 0, every {info['eval_interval']} iterations and at "
            f"the end{best}")
