"""The tokenizer facts preprocessing needs, loaded once in the main process and shipped to workers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.errors import UserError

# Files that decide tokenization (weights and model config do not); used for the skip-if-done fingerprint.
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")
_TOKENIZER_FILE_SUFFIXES = (".tiktoken", ".model")


def tokenizer_files(path: str | Path) -> list[Path]:
    d = Path(path)
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir()
        if p.is_file() and (p.name.startswith(_TOKENIZER_FILE_PREFIXES) or p.name.endswith(_TOKENIZER_FILE_SUFFIXES))
    )


@dataclass
class TokenizerInfo:
    """Picklable: the backend (Rust) tokenizer plus the special tokens templates and masks need."""

    backend: object  # tokenizers.Tokenizer
    vocab_size: int
    eos_id: int | None
    pad_id: int | None
    bos_token: str
    eos_token: str
    special_tokens_map: dict
    chat_template: str | None


def load_tokenizer(path: str, key: str = "--tokenizer-name-or-path") -> TokenizerInfo:
    """key: how messages name the path (the flag, or model_name_or_path under `train`)."""
    if not Path(path).is_dir():
        raise UserError(f"{key} {path}: not a folder; give the model folder holding tokenizer files")
    if not tokenizer_files(path):
        # transformers may still build an empty tokenizer from config.json alone: every sample would be 0 tokens.
        raise UserError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab/merges, "
                        "tokenizer.model); copy the model's tokenizer files into this folder")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds for unreadable folders
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{path}: no fast (tokenizers) tokenizer; add a tokenizer.json (save_pretrained of a fast "
                        "tokenizer)")
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return TokenizerInfo(
        backend=backend,
        vocab_size=len(tok),
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        bos_token=tok.bos_token or "",
        eos_token=tok.eos_token or "",
        special_tokens_map={k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)},
        chat_template=template,
    )


def byte_level_token_lengths(backend) -> tuple[object, bool] | None:
    """For a byte-level BPE tokenizer: (numpy array of each token id's length in UTF-8 bytes, whether the text
    must be NFC-normalized for those lengths to add up). None for other tokenizers (then token spans come
    from the tokenizer's character offsets, which is slower)."""
    import numpy as np  # here: this module is imported by `plan` (outputs.py), which needs no numpy

    spec = json.loads(backend.to_str())
    model, decoder, normalizer = spec.get("model") or {}, spec.get("decoder") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        return None
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    lengths = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in model["vocab"].items():
        lengths[i] = len(token)  # one byte-level character per byte
    for added in spec.get("added_tokens") or []:
        lengths[added["id"]] = len(added["content"].encode("utf-8"))
    return lengths, normalizer is not None
