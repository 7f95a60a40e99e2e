"""Pretraining encoder: both engines (HF tokenizers, optional gigatoken) give tokenizer(text).input_ids + EOD."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from ascendfactory.data import fast_encode
from ascendfactory.data.fast_encode import TextEncoder
from ascendfactory.tiny import corpus_text, make_tokenizer

TEXTS = corpus_text(30) + ["hello <|endoftext|> world <|im_end|> x", "  leading spaces\n\n\ttabs", "ünïcödé 😺 中文",
                           "def f(x):\n    return x  # code"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {flavor: str(make_tokenizer(root / flavor, flavor)) for flavor in ("qwen", "llama3")}


def _split(tokens, lengths):
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("engine", ["tokenizers", "gigatoken"])
@pytest.mark.parametrize("flavor", ["qwen", "llama3"])
@pytest.mark.parametrize("special,eod", [(True, True), (True, False), (False, False)])
def test_encoder_equals_hf_tokenizer(toks, monkeypatch, engine, flavor, special, eod):
    monkeypatch.setattr(fast_encode, "VERIFY_FIRST_TOKENS", 100)  # later documents are only sampled
    monkeypatch.setattr(fast_encode, "GIGATOKEN_MIN_CHARS", 0)  # gigatoken for these small batches too
    if engine == "gigatoken":
        pytest.importorskip("gigatoken")
        pytest.importorskip("awkward")
    monkeypatch.setenv("ASCENDFACTORY_GIGATOKEN", "1" if engine == "gigatoken" else "0")
    hf = AutoTokenizer.from_pretrained(toks[flavor])
    enc = TextEncoder(hf.backend_tokenizer, toks[flavor], special_tokens=special, eod=hf.eos_token_id if eod else None)
    for chunk in (TEXTS, TEXTS[::-1]):
        tokens, lengths = enc.encode(chunk)
        assert tokens.dtype == np.int32
        want = [hf(t, add_special_tokens=special)["input_ids"] + ([hf.eos_token_id] if eod else []) for t in chunk]
        assert _split(tokens, lengths) == want
    assert enc.engine == engine  # no fallback was needed


def test_gigatoken_mismatch_falls_back_to_hf(toks, monkeypatch, caplog):
    pytest.importorskip("gigatoken")
    pytest.importorskip("awkward")
    monkeypatch.setenv("ASCENDFACTORY_GIGATOKEN", "1")
    monkeypatch.setattr(fast_encode, "GIGATOKEN_MIN_CHARS", 0)
    hf = AutoTokenizer.from_pretrained(toks["qwen"])
    enc = TextEncoder(hf.backend_tokenizer, toks["qwen"])
    enc._try_gigatoken()
    assert enc.engine == "gigatoken"
    enc.prefix = [0]  # pretend gigatoken's output differs from the reference
    tokens, lengths = enc.encode(TEXTS)
    assert _split(tokens, lengths) == [hf(t)["input_ids"] for t in TEXTS]
    assert enc.engine == "tokenizers"
    assert "gigatoken differs from the HF tokenizer" in caplog.text  # (capsys saw it only after other tests)


def test_gigatoken_waits_for_a_batch_that_repays_its_load(toks, monkeypatch):
    """A small input is encoded by the HF tokenizer without importing gigatoken (its load costs more than such an
    input's encoding); the first batch of GIGATOKEN_MIN_CHARS characters loads it."""
    pytest.importorskip("gigatoken")
    pytest.importorskip("awkward")
    monkeypatch.setenv("ASCENDFACTORY_GIGATOKEN", "1")
    monkeypatch.setattr(fast_encode, "GIGATOKEN_MIN_CHARS", sum(map(len, TEXTS)) + 1)
    hf = AutoTokenizer.from_pretrained(toks["qwen"])
    enc = TextEncoder(hf.backend_tokenizer, toks["qwen"])
    enc.encode(TEXTS)
    assert enc.engine == "tokenizers"
    tokens, lengths = enc.encode(TEXTS + TEXTS[:1])
    assert enc.engine == "gigatoken"
    assert _split(tokens, lengths) == [hf(t)["input_ids"] for t in TEXTS + TEXTS[:1]]
