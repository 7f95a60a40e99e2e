"""Names of the preprocessing outputs, what identifies one result (its fingerprint), and the summary json
written beside the outputs.

Only stats files (size + mtime) and reads json: `plan` uses it and must stay fast (no torch/transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

from ascendfactory.config.schema import PRETRAIN
from ascendfactory.data.tokenizer import tokenizer_files
from ascendfactory.fsutil import write_text_atomic

# bump when the output for the same inputs changes (templates, truncation, packing, file layout)
FORMAT_VERSION = 1
SUMMARY_SUFFIX = "_preprocess_summary.json"
SFT_STREAMS = ("input_ids", "attention_mask", "labels")


def sft_prefixes(output_prefix: str | Path) -> list[str]:
    """The three datasets of instruction data, input_ids first."""
    return [f"{output_prefix}_packed_{s}_document" for s in SFT_STREAMS]


def output_prefixes(output_prefix: str, handler: str, json_keys: list[str]) -> list[str]:
    if handler == PRETRAIN:
        return [f"{output_prefix}_{key}_document" for key in json_keys]
    return sft_prefixes(output_prefix)


def data_prefix(output_prefix: str, handler: str, json_keys: list[str]) -> str:
    """What training is given: `<prefix>_text_document` (first json key) or `<prefix>`."""
    return output_prefixes(output_prefix, handler, json_keys)[0] if handler == PRETRAIN else str(output_prefix)


def existing_outputs(output_prefix: str | Path, handler: str, json_keys: list[str]) -> list[Path]:
    """The files a preprocessing into output_prefix would write (or replace) that exist already."""
    files = [Path(f"{p}.{ext}") for p in output_prefixes(output_prefix, handler, json_keys) for ext in ("bin", "idx")]
    return [f for f in files + [summary_path(output_prefix)] if f.exists()]


def options(handler, prompt_type, seq_length, pack, append_eod, json_keys, map_keys, skip_bad_records,
            max_record_mb) -> dict:
    """The options that change the output (workers do not)."""
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError:
            pass  # parse_map_keys reports it
    return dict(handler=handler, prompt_type=prompt_type, seq_length=seq_length, pack=pack, append_eod=append_eod,
                json_keys=list(json_keys), map_keys=map_keys or None, skip_bad_records=skip_bad_records,
                max_record_mb=max_record_mb)


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(files: list[Path], tokenizer: str, options: dict) -> dict:
    """Input files' size+mtime (files: readers.discover's), tokenizer files' size+mtime, and every option that
    changes the output."""
    return {
        "format_version": FORMAT_VERSION,
        "inputs": [_stat(f) for f in files],
        "tokenizer": [_stat(f) for f in tokenizer_files(tokenizer)],
        "options": options,
    }


def summary_path(output_prefix: str | Path) -> Path:
    return Path(f"{output_prefix}{SUMMARY_SUFFIX}")


def read_summary(output_prefix: str | Path) -> dict | None:
    try:
        return json.loads(summary_path(output_prefix).read_text())
    except (OSError, ValueError):
        return None


def write_summary(output_prefix: str | Path, content: dict) -> None:
    write_text_atomic(summary_path(output_prefix), json.dumps(content, indent=1, sort_keys=True) + "\n")
