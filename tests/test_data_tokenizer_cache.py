"""The tokenizer cache: the first load goes through transformers, later loads rebuild exactly what it produced
with the tokenizers library alone (fast start-up: no transformers, no torch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ascendfactory.data.tokenizer import load_tokenizer, tokenizer_cache_dir
from ascendfactory.tiny import corpus_text, make_remote_glm_tokenizer, make_tokenizer

TEXTS = ["\n".join(corpus_text(5)), "<|im_start|>user\nhi  cafe\u0301 there<|im_end|>\n", " sop eop [gMASK]sop<|user|>",
         "\ud55c\uad6d\uc5b4 \u4e2d\u6587 \U0001f600  \n\n\tx"]


def _qwen2_class(d: Path) -> Path:
    """A tokenizer_config naming Qwen2Tokenizer, as Qwen's checkpoints do: transformers then rebuilds the
    tokenizer.json pipeline (NFC, its own split pattern), so tokenizer.json alone would not be equivalent."""
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    return d


TOKENIZERS = {
    "qwen": lambda p: make_tokenizer(p, "qwen"),
    "llama3": lambda p: make_tokenizer(p, "llama3"),
    "qwen2-class": lambda p: _qwen2_class(make_tokenizer(p, "qwen")),
    "chatglm3": lambda p: make_remote_glm_tokenizer(p, "chatglm3"),
    "glm4-remote": lambda p: make_remote_glm_tokenizer(p, "glm4"),
}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_cached_load_equals_the_transformers_load_token_for_token(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("ASCENDFACTORY_TOKENIZER_CACHE", str(tmp_path / "cache"))
    d = str(TOKENIZERS[kind](tmp_path / kind))
    first = load_tokenizer(d)
    assert len(list(tokenizer_cache_dir().iterdir())) == 1
    again = load_tokenizer(d)
    assert type(again.backend) is type(first.backend) and again.backend is not first.backend
    assert {k: v for k, v in vars(again).items() if k != "backend"} == \
           {k: v for k, v in vars(first).items() if k != "backend"}
    for text in TEXTS:
        for special in (True, False):
            a, b = first.backend.encode(text, add_special_tokens=special), again.backend.encode(text,
                                                                                             add_special_tokens=special)
            assert (a.ids, a.offsets) == (b.ids, b.offsets)


def test_cache_follows_the_tokenizer_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCENDFACTORY_TOKENIZER_CACHE", str(tmp_path / "cache"))
    d = make_tokenizer(tmp_path / "tok", "qwen")
    load_tokenizer(str(d))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))
    info = load_tokenizer(str(d))
    assert info.eos_token == "<|endoftext|>" and info.eos_id == info.backend.token_to_id("<|endoftext|>")
    assert len(list(tokenizer_cache_dir().iterdir())) == 2


def test_cached_preprocess_start_imports_neither_transformers_nor_torch(tmp_path):
    d = make_tokenizer(tmp_path / "tok", "qwen")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    code = ("import sys; from ascendfactory.cli import main; sys.argv = ['x', 'preprocess', '--input', sys.argv[1], "
            "'--tokenizer-name-or-path', sys.argv[2], '--output-prefix', sys.argv[3], '--overwrite']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "print('LOADED', [m for m in ('torch', 'transformers', 'megatron') if m in sys.modules])")
    env = {**os.environ, "ASCENDFACTORY_TOKENIZER_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code, str(data), str(d), str(tmp_path / "out")], env=env,
                           capture_output=True, text=True) for _ in range(2)]
    assert all("preprocess done" in r.stderr for r in runs), runs[-1].stderr
    assert "LOADED []" in runs[1].stdout, runs[1].stdout
