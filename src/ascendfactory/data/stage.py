"""The `preprocess` stage of `train`: decide (fast, for `plan`), run, and find the data prefix training uses.

decide() only stats files and reads json (no torch / transformers imports), so `plan` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from ascendfactory.config.paths import RunPaths
from ascendfactory.config.schema import PRETRAIN, ExpConfig
from ascendfactory.data import outputs as out
from ascendfactory.data.names import YAML_KEYS
from ascendfactory.data.readers import discover
from ascendfactory.errors import UserError


def dataset_name(dataset: str) -> str:
    """`alpaca` for /data/alpaca.jsonl or /data/alpaca/ (the output prefix's last part)."""
    p = Path(dataset.rstrip("/"))
    return p.stem if p.is_file() else p.name


def _prefix(cfg: ExpConfig, paths: RunPaths) -> Path:
    return Path(paths.processed_data_dir) / dataset_name(cfg.dataset)


def eval_data_dir(cfg: ExpConfig, paths: RunPaths) -> Path:
    """Where the validation data is read: eval_processed_data_dir, or eval_dataset preprocessed into a folder of
    its own under `<output_dir>/preprocessed_data/` (training finds one dataset per folder)."""
    if cfg.eval_processed_data_dir:
        return Path(cfg.eval_processed_data_dir)
    return paths.output_dir / "preprocessed_data" / "validation"


def _eval_prefix(cfg: ExpConfig, paths: RunPaths) -> Path:
    return eval_data_dir(cfg, paths) / dataset_name(cfg.eval_dataset)


def _options(cfg: ExpConfig) -> dict:
    return out.options(cfg.handler_name, cfg.prompt_type, cfg.seq_len, cfg.pack, cfg.append_eod, cfg.json_keys,
                       cfg.map_keys, cfg.skip_bad_records, cfg.max_record_mb)


def decide(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    """(run?, why) for the preprocess stage: the training data, and eval_dataset when given."""
    run, why = _decide_training(cfg, paths)
    if cfg.eval_processed_data_dir:
        prefix = find_data_prefix(cfg.eval_processed_data_dir, cfg.stage)
        return run, f"{why}; validation reads {prefix}"
    if not cfg.eval_dataset:
        return run, why
    run_eval, why_eval = _decide_raw(cfg, cfg.eval_dataset, _eval_prefix(cfg, paths), "eval_dataset")
    return run or run_eval, f"{why}; validation: {why_eval}"


def _decide_training(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    if cfg.processed_data_dir:
        # Checked here, before any work, so a wrong folder fails in a second and not when training starts.
        prefix = find_data_prefix(cfg.processed_data_dir, cfg.stage)
        return False, f"processed_data_dir given: training reads {prefix}"
    if not cfg.dataset:
        return False, "no dataset given"
    return _decide_raw(cfg, cfg.dataset, _prefix(cfg, paths), "dataset")


def _decide_raw(cfg: ExpConfig, dataset: str, prefix: Path, key: str) -> tuple[bool, str]:
    """(run?, why) for one raw dataset preprocessed into `prefix`."""
    if not Path(dataset).exists():
        raise UserError(f"{key}: {dataset} does not exist; give a data file or folder "
                        "(json, jsonl, parquet, csv, arrow, txt)")
    try:
        wanted = out.fingerprint(discover(dataset, YAML_KEYS["input"])[0], cfg.model_name_or_path,
                                 _options(cfg))
    except UserError as e:
        return True, f"preprocess {dataset} ({e})"
    done = out.read_summary(prefix)
    if done is None:
        return True, f"no preprocessed data at {prefix}_*"
    if not all(Path(p).is_file() for p in done.get("outputs", [])):
        return True, f"preprocessed data at {prefix}_* is incomplete"
    old = done.get("fingerprint", {})
    changed = [k for k in ("format_version", "inputs", "tokenizer", "options") if old.get(k) != wanted[k]]
    if changed:
        what = {"inputs": "dataset files", "tokenizer": "tokenizer files", "options": "preprocessing options",
                "format_version": "preprocessing format"}
        return True, f"{' and '.join(what[k] for k in changed)} changed since {prefix}_* was written"
    return False, f"already preprocessed (same inputs and options): {done.get('data_prefix', prefix)}"


def run(cfg: ExpConfig, paths: RunPaths) -> str | None:
    """Preprocess cfg.dataset into <processed_data_dir>/<dataset name>_*, and cfg.eval_dataset (unless already
    done) into <output_dir>/preprocessed_data/validation/<its name>_*; returns the data prefix for training."""
    if not cfg.dataset and not cfg.processed_data_dir:
        raise UserError("dataset: not set; give dataset (raw data) or processed_data_dir (preprocessed data)")
    prefix = None
    # With eval_dataset the stage may run for the validation data alone: the training data only when needed.
    if cfg.dataset and (not cfg.eval_dataset or _decide_training(cfg, paths)[0]):
        prefix = _preprocess(cfg, cfg.dataset, _prefix(cfg, paths))
    if cfg.eval_dataset and _decide_raw(cfg, cfg.eval_dataset, _eval_prefix(cfg, paths), "eval_dataset")[0]:
        _preprocess(cfg, cfg.eval_dataset, _eval_prefix(cfg, paths))
    return prefix


def _preprocess(cfg: ExpConfig, dataset: str, prefix: Path) -> str:
    from ascendfactory.data.preprocess import preprocess_command

    prefix.parent.mkdir(parents=True, exist_ok=True)
    preprocess_command(
        input=dataset, tokenizer_name_or_path=cfg.model_name_or_path, output_prefix=str(prefix),
        handler_name=cfg.handler_name, prompt_type=cfg.prompt_type, seq_length=cfg.seq_len, pack=cfg.pack,
        append_eod=cfg.append_eod, json_keys=cfg.json_keys, map_keys=cfg.map_keys, workers=cfg.preprocess_workers,
        skip_bad_records=cfg.skip_bad_records, max_record_mb=cfg.max_record_mb,
        overwrite=True, names=YAML_KEYS,  # preprocessed_data/ is the run's own folder; decide() said it must be redone
    )
    return out.data_prefix(str(prefix), cfg.handler_name, cfg.json_keys)


def find_data_prefix(processed_data_dir: str | Path, stage: str) -> str:
    """The prefix training is given (stage "pt": `<prefix>_<key>_document`, else `<prefix>`) found in a folder;
    a path that is itself a prefix is accepted too."""
    d = Path(processed_data_dir)
    sft = stage != "pt"
    if not d.is_dir():
        as_prefix = Path(f"{out.sft_prefixes(d)[0] if sft else d}.idx")
        if as_prefix.is_file():
            return str(d)
        raise UserError(f"processed_data_dir {d}: no such folder")
    found = []
    for summary_file in sorted(d.glob(f"*{out.SUMMARY_SUFFIX}")):
        summary = out.read_summary(d / summary_file.name[: -len(out.SUMMARY_SUFFIX)]) or {}
        handler = summary.get("fingerprint", {}).get("options", {}).get("handler")
        if handler and (handler == PRETRAIN) != sft and "data_prefix" in summary:
            found.append(str(d / Path(summary["data_prefix"]).name))  # the folder may have been moved
    if not found:  # data written by other tools: go by file names
        if sft:
            found = [str(p)[: -len("_packed_input_ids_document.idx")]
                     for p in sorted(d.glob("*_packed_input_ids_document.idx"))]
        else:
            found = [str(p)[: -len(".idx")] for p in sorted(d.glob("*_document.idx")) if "_packed_" not in p.name]
    expected = "<prefix>_packed_{input_ids,attention_mask,labels}_document.{bin,idx}" if sft else \
        "<prefix>_text_document.{bin,idx}"
    if not found:
        raise UserError(f"processed_data_dir {d}: no preprocessed {'instruction' if sft else 'pretraining'} data; "
                        f"expected {expected}")
    if len(found) > 1:
        raise UserError(f"processed_data_dir {d}: several datasets ({', '.join(Path(f).name for f in found)}); "
                        "keep one per folder")
    missing = [p for p in _files_of(found[0], sft) if not p.is_file()]
    if missing:
        raise UserError(f"processed_data_dir {d}: {missing[0].name} is missing; expected {expected}")
    return found[0]


def _files_of(prefix: str, sft: bool) -> list[Path]:
    names = out.sft_prefixes(prefix) if sft else [prefix]
    return [Path(f"{n}.{ext}") for n in names for ext in ("bin", "idx")]
