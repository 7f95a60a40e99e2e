"""Templates and label masks, token for token against the tokenizer's own apply_chat_template."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from ascendfactory.data.encode import IGNORE_INDEX, encode_chunk, truncation_keep
from ascendfactory.data.handlers import parse_map_keys
from ascendfactory.data.preprocess import make_job
from ascendfactory.data.tokenizer import load_tokenizer
from ascendfactory.tiny import make_tokenizer

CONVERSATIONS = [
    # (system or None, [(user, assistant), ...])
    (None, [("what is 2 plus 3", "2 plus 3 is 5.")]),
    ("You answer briefly.", [("hello world", "hello"), ("what is the capital of france", " paris is the answer ")]),
    ("Système: réponds en français ✓", [("  translate this sentence\n", "le chat dort 😺"),
                                        ("and this one", "def add(a, b): return a + b"),
                                        ("thanks", "you are welcome")]),
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {flavor: str(make_tokenizer(root / flavor, flavor)) for flavor in ("qwen", "llama3")}


def _messages(system, pairs):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def _encode(tok_dir, prompt_type, records, handler="SharegptStyleInstructionHandler", seq_length=100000,
            by_offsets=False):
    job = make_job(handler, tok_dir, load_tokenizer(tok_dir), prompt_type, seq_length, ["text"], False,
                   parse_map_keys(handler, None))
    assert job.token_bytes is not None  # the tiny tokenizers are byte-level BPE: the fast path
    if by_offsets:  # the path non-byte-level tokenizers take
        job.token_bytes = job.encoder = None
    res = encode_chunk(job, [(f"rec:{i}", r) for i, r in enumerate(records)])
    assert not res.bad
    bounds = np.concatenate([[0], np.cumsum(res.lengths)])
    return [(res.ids[a:b], res.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])], res


def _sharegpt(system, pairs):
    conv = [{"from": "system", "value": system}] if system is not None else []
    for q, a in pairs:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


def _supervised_runs(labels):
    """Contiguous runs of supervised label values."""
    runs, cur = [], []
    for v in labels.tolist():
        if v == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(v)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("flavor", ["qwen", "llama3"])
@pytest.mark.parametrize("prompt_type", ["auto", "builtin"])
@pytest.mark.parametrize("spans_by", ["bytes", "offsets"])
def test_ids_equal_apply_chat_template_and_labels_cover_replies(toks, flavor, prompt_type, spans_by):
    tok_dir = toks[flavor]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    samples, _ = _encode(tok_dir, flavor if prompt_type == "builtin" else "auto",
                         [_sharegpt(s, p) for s, p in CONVERSATIONS], by_offsets=spans_by == "offsets")
    end_of_turn = "<|im_end|>" if flavor == "qwen" else "<|eot_id|>"
    for (ids, labels), (system, pairs) in zip(samples, CONVERSATIONS):
        expected = hf.apply_chat_template(_messages(system, pairs), tokenize=True)["input_ids"]
        assert ids.tolist() == list(expected)
        sup = labels != IGNORE_INDEX
        assert (labels[sup] == ids[sup]).all()
        runs = _supervised_runs(labels)
        assert len(runs) == len(pairs)
        for run, (_, answer) in zip(runs, pairs):
            want = answer.strip() if flavor == "llama3" else answer  # Llama-3's template trims
            assert hf.decode(run) == want + end_of_turn


@pytest.mark.parametrize("prompt_type,render,reply_end", [
    ("llama2", "<|begin_of_text|>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 <|eot_id|>"
               "<|begin_of_text|>[INST] q2 [/INST] a2 <|eot_id|>", " <|eot_id|>"),
    ("mistral", "<|begin_of_text|>[INST] S\n\nq1 [/INST]a1<|eot_id|>[INST] q2 [/INST]a2<|eot_id|>", "<|eot_id|>"),
    ("empty", "Sq1a1<|eot_id|>q2a2<|eot_id|>", "<|eot_id|>"),
])
def test_other_templates_render_and_mask(toks, prompt_type, render, reply_end):
    tok_dir = toks["llama3"]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    [(ids, labels)], _ = _encode(tok_dir, prompt_type, [_sharegpt("S", [("q1", "a1"), ("q2", "a2")])])
    assert hf.decode(ids) == render
    # a token that straddles the reply's first character (BPE's leading space) counts as part of the reply
    assert [hf.decode(r).lstrip() for r in _supervised_runs(labels)] == [f"a1{reply_end}", f"a2{reply_end}"]


def test_alpaca_history_system_and_legacy_prompt(toks):
    tok_dir = toks["qwen"]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    rec = {"instruction": "what is 1 plus 1", "input": "in words", "output": "two", "system": "be exact",
           "history": [["hello", "hi"]]}
    [(ids, labels)], _ = _encode(tok_dir, "qwen", [rec], handler="AlpacaStyleInstructionHandler")
    msgs = _messages("be exact", [("hello", "hi"), ("what is 1 plus 1\nin words", "two")])
    assert ids.tolist() == list(hf.apply_chat_template(msgs, tokenize=True)["input_ids"])
    assert [hf.decode(r) for r in _supervised_runs(labels)] == ["hi<|im_end|>", "two<|im_end|>"]
    [(ids, labels)], _ = _encode(tok_dir, "auto", [rec], handler="GeneralInstructionHandler")
    text = hf.decode(ids)
    assert text.startswith("Below is an instruction") and "### Instruction:\nwhat is 1 plus 1\nin words\n\n" \
        "### Response:\ntwo<|im_end|>" in text
    assert [hf.decode(r) for r in _supervised_runs(labels)] == ["two<|im_end|>"]


def test_openai_messages_and_tool_roles(toks):
    tok_dir = toks["qwen"]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
            {"role": "function_call", "content": '{"name": "w", "arguments": {}}'},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "it is sunny"}]
    tools = json.dumps([{"name": "w", "description": "weather", "parameters": {}}])
    [(ids, labels)], _ = _encode(tok_dir, "qwen", [{"messages": msgs, "tools": tools}],
                                 handler="OpenAIStyleInstructionHandler")
    text = hf.decode(ids)
    assert "# Tools" in text and "<tools>\n" + json.dumps(json.loads(tools)[0]) in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert [hf.decode(r) for r in _supervised_runs(labels)] == [
        '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call><|im_end|>', "it is sunny<|im_end|>"]


def test_truncation_cuts_prompt_and_reply_in_proportion_keeping_end_of_turn(toks):
    tok_dir = toks["qwen"]
    hf = AutoTokenizer.from_pretrained(tok_dir)
    long_q, long_a = "please write " * 30, "the sea and the sky " * 30
    [(full, _)], _ = _encode(tok_dir, "qwen", [_sharegpt(None, [(long_q, long_a)])])
    [(ids, labels)], res = _encode(tok_dir, "qwen", [_sharegpt(None, [(long_q, long_a)])], seq_length=64)
    assert res.truncated == 1 and len(ids) == 64
    sup = labels != IGNORE_INDEX
    assert ids[-1] == hf.convert_tokens_to_ids("<|im_end|>") and sup[-1]
    n_sup = int(sup.sum())
    a0 = int(np.argmax(sup))
    assert a0 + n_sup == 64  # prompt part, then the reply part
    full_sup = int((_encode(tok_dir, "qwen", [_sharegpt(None, [(long_q, long_a)])])[0][0][1] != IGNORE_INDEX).sum())
    assert abs(n_sup / 64 - full_sup / len(full)) < 0.05  # cut in proportion
    assert ids[:a0].tolist() == full[:a0].tolist()  # the prompt keeps its beginning


def test_truncation_keep_rule():
    # turns: prompt 0..4 reply 4..6, prompt 6..8 reply 8..12; tail none
    assert truncation_keep(12, [(4, 6), (8, 12)], 12).tolist() == list(range(12))
    # first turn fits (6), then 4 left for prompt 2 + reply 4: reply gets round(4*4/6)=3 -> 2 first + last
    assert truncation_keep(12, [(4, 6), (8, 12)], 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 11]
    # budget of one: the end-of-turn token alone survives from the reply
    assert truncation_keep(6, [(4, 6)], 1).tolist() == [5]
