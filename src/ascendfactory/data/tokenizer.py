"""The tokenizer facts preprocessing needs, loaded once in the main process and shipped to workers."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.errors import UserError
from ascendfactory.fsutil import write_text_atomic

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


# The original GLM checkpoints' tokenizers are remote code (never run here): their special tokens follow the
# tokenizer.model pieces, in this order (ChatGLM3's SPTokenizer; glm-4-9b's tokenizer_config.json).
CHATGLM3_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
_REMOTE_TOKENIZERS = ("ChatGLMTokenizer", "ChatGLM4Tokenizer")
# glm-4-9b's tiktoken split pattern (ChatGLM4Tokenizer.pat_str)
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore the model's file") from None


def remote_glm_tokenizer(path: str | Path) -> bool:
    """An original GLM checkpoint whose tokenizer is remote code: no tokenizer.json, a ChatGLM tokenizer class."""
    d = Path(path)
    if (d / "tokenizer.json").is_file():
        return False
    tcfg = _json(d / "tokenizer_config.json")
    names = [tcfg.get("tokenizer_class") or ""] + [str(v) for v in (tcfg.get("auto_map") or {}).values()]
    from ascendfactory.modelinfo import is_chatglm

    return any(r in n for n in names for r in _REMOTE_TOKENIZERS) or is_chatglm(_json(d / "config.json"))


def _is_tiktoken(model_file: Path) -> bool:
    """glm-4-9b's tokenizer.model is text lines `<base64 token> <rank>`; ChatGLM3's is a SentencePiece protobuf."""
    import re

    with model_file.open("rb") as f:
        return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", f.readline()) is not None


def _tiktoken_ranks(model_file: Path) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in model_file.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _specials(tcfg: dict, default: tuple[str, ...], first_id: int) -> list[str]:
    """The special tokens in id order from first_id: tokenizer_config.json's added_tokens_decoder, else `default`."""
    added = {int(i): t["content"] for i, t in (tcfg.get("added_tokens_decoder") or {}).items() if int(i) >= first_id}
    return [added[i] for i in sorted(added)] if added else list(default)


def glm_fast_tokenizer(path: str | Path):
    """A transformers fast tokenizer equal to an original GLM checkpoint's remote-code one, built from its
    tokenizer.model with transformers' converters: ChatGLM3 (SentencePiece; encodings start with [gMASK]sop) or
    glm-4-9b (tiktoken ranks; encodings start with [gMASK]<sop>), special tokens at their original ids."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    d = Path(path)
    model_file = d / "tokenizer.model"
    if not model_file.is_file():
        raise UserError(f"{model_file}: not found; this GLM checkpoint's tokenizer is built from its tokenizer.model "
                        "(or give a tokenizer.json): copy the model's tokenizer files into this folder")
    tcfg = _json(d / "tokenizer_config.json")
    if _is_tiktoken(model_file):
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = _tiktoken_ranks(model_file)
        n = len(ranks)  # entries of tokenizer.model: the special tokens' ids follow
        specials = _specials(tcfg, GLM4_SPECIALS, n)

        class _Ranks(TikTokenConverter):  # the ranks above: no tiktoken package needed to read the file
            @staticmethod
            def load_tiktoken_bpe(_):
                return ranks

        tok = _Ranks(str(model_file), pattern=GLM4_PATTERN).converted()
        prefix, eos, pad = ("[gMASK]", "<sop>"), "<|endoftext|>", "<|endoftext|>"
        post = [processors.ByteLevel(trim_offsets=False)]
    else:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        proto = import_protobuf().ModelProto()
        try:
            proto.ParseFromString(model_file.read_bytes())
        except Exception as e:  # protobuf's DecodeError
            raise UserError(f"{model_file}: not a SentencePiece or tiktoken model ({e}); restore the file") from None
        # legacy: every text piece between special tokens gets SentencePiece's dummy prefix, as the original
        # tokenizer encodes each piece on its own
        tok = SpmConverter.build_tokenizer_from_spm_proto(
            proto, {p.piece: i for i, p in enumerate(proto.pieces)}, legacy=True)
        n = len(proto.pieces)
        specials = list(CHATGLM3_SPECIALS)  # fixed by its remote code (SPTokenizer), whatever its config lists
        prefix = ("[gMASK]", "sop")
        eos, pad = proto.pieces[proto.trainer_spec.eos_id].piece, proto.pieces[proto.trainer_spec.unk_id].piece
        post = []
    # "sop" / "eop" are plain words too: matched only as a whole word ("[gMASK]sop<|user|>" still is one)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, single_word=t.isalpha())
                            for t in specials])
    wrong = [t for k, t in enumerate(specials) if tok.token_to_id(t) != n + k]
    if wrong:
        raise UserError(f"{d / 'tokenizer_config.json'}: special token {wrong[0]} does not follow the "
                        f"{n} tokenizer.model entries; restore the model's tokenizer files")
    tok.post_processor = processors.Sequence(post + [processors.TemplateProcessing(
        single=" ".join(prefix) + " $A", pair=" ".join(prefix) + " $A $B",
        special_tokens=[(t, tok.token_to_id(t)) for t in prefix])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   chat_template=tcfg.get("chat_template"))


def hf_tokenizer(path: str | Path):
    """The model folder's transformers tokenizer; for an original GLM checkpoint, the equivalent fast tokenizer
    built from its tokenizer.model (no remote code, no hand edits)."""
    if remote_glm_tokenizer(path):
        return glm_fast_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_tokenizer(path: str, key: str = "--tokenizer-name-or-path") -> TokenizerInfo:
    """key: how messages name the path (the flag, or model_name_or_path under `train`).

    transformers takes seconds to load a large vocabulary (and may rebuild the tokenizer.json pipeline for its
    tokenizer class), the tokenizers library alone well under one: the first load of a tokenizer goes through
    transformers and stores what it produced (the backend's serialization and the special tokens) in the cache,
    keyed by the tokenizer files' bytes and both libraries' versions; later loads rebuild exactly that backend
    with the tokenizers library."""
    if not Path(path).is_dir():
        raise UserError(f"{key} {path}: not a folder; give the model folder holding tokenizer files")
    if not tokenizer_files(path) and not remote_glm_tokenizer(path):  # GLM's names its own missing file
        # transformers may still build an empty tokenizer from config.json alone: every sample would be 0 tokens.
        raise UserError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab/merges, "
                        "tokenizer.model); copy the model's tokenizer files into this folder")
    cached = _cache_entry(path)
    if cached is not None and (cached / "facts.json").is_file():  # written last: the entry is complete
        from tokenizers import Tokenizer

        facts = json.loads((cached / "facts.json").read_text(encoding="utf-8"))
        return TokenizerInfo(backend=Tokenizer.from_file(str(cached / "tokenizer.json")), **facts)
    info = _load_with_transformers(path)
    if cached is not None:
        try:
            cached.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached / "tokenizer.json", info.backend.to_str())
            write_text_atomic(cached / "facts.json", json.dumps({k: v for k, v in vars(info).items()
                                                                 if k != "backend"}))
        except OSError:
            pass  # an unwritable cache only costs the next run the slow load
    return info


def tokenizer_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("ASCENDFACTORY_TOKENIZER_CACHE") or Path(base) / "ascendfactory" / "tokenizers")


def _cache_entry(path: str | Path) -> Path | None:
    """The cache folder for this folder's tokenizer files (config.json too: it marks ChatGLM checkpoints) under
    the installed transformers and tokenizers; None where one cannot be named."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    try:
        h.update(f"{version('transformers')} {version('tokenizers')}".encode())
    except PackageNotFoundError:
        return None
    d = Path(path)
    try:
        for f in tokenizer_files(d) + ([d / "config.json"] if (d / "config.json").is_file() else []):
            h.update(f"\0{f.name}\0{f.stat().st_size}\0".encode())
            h.update(f.read_bytes())
    except OSError:  # an unreadable file: the transformers load names it
        return None
    return tokenizer_cache_dir() / h.hexdigest()


def _load_with_transformers(path: str) -> TokenizerInfo:
    try:
        tok = hf_tokenizer(path)
    except UserError:
        raise
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
