"""`ascendfactory-cli preprocess` end to end: every handler x input format, read back with megatron-core's
IndexedDataset; packing; bad input (exit 2, file:line, no outputs) and --skip-bad-records."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from ascendfactory.cli import main
from ascendfactory.tiny import corpus_text, make_tokenizer

datasets.disable_progress_bars()
LINES = corpus_text(24)
ALPACA = [{"instruction": f"what is {i} plus 1", "input": "" if i % 2 else "in words", "output": LINES[i]}
          for i in range(24)]
SHAREGPT = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": r["instruction"]},
                               {"from": "gpt", "value": r["output"]}]} for r in ALPACA]
OPENAI = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]},
                        {"role": "user", "content": "and again"}, {"role": "assistant", "content": "same"}]}
          for r in ALPACA]
PRETRAIN = [{"text": t} for t in LINES]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(make_tokenizer(tmp_path_factory.mktemp("tok") / "qwen", "qwen"))


@pytest.fixture(scope="module")
def hf(tok):
    return AutoTokenizer.from_pretrained(tok)


def write(path, records, fmt):
    """records in one of the input formats; returns the --input path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n\n" for r in records))
    else:
        ds = datasets.Dataset.from_list(records)
        if fmt == "parquet":
            ds.to_parquet(str(path))
        elif fmt == "csv":
            ds.to_csv(str(path), index=False)
        elif fmt == "arrow":  # a save_to_disk folder: .arrow shards + metadata json
            ds.save_to_disk(str(path))
    return str(path)


def run_cli(capsys, *args):
    try:
        main(["preprocess", *map(str, args)])
        rc = 0
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def read(prefix):
    return IndexedDataset(str(prefix))


def messages_of(handler, rec):
    if handler == "AlpacaStyleInstructionHandler":
        q = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
        return [{"role": "user", "content": q}, {"role": "assistant", "content": rec["output"]}]
    if handler == "SharegptStyleInstructionHandler":
        roles = {"system": "system", "human": "user", "gpt": "assistant"}
        return [{"role": roles[m["from"]], "content": m["value"]} for m in rec["conversations"]]
    return rec["messages"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "arrow", "txt"])
def test_pretrain_every_format(tmp_path, capsys, tok, hf, fmt):
    src = write(tmp_path / f"in.{fmt}", PRETRAIN, fmt)
    rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix",
                      tmp_path / "out" / "pt", "--handler-name", "GeneralPretrainHandler", "--append-eod")
    assert rc == 0, err
    assert "preprocess done: records 24" in err
    ds = read(tmp_path / "out" / "pt_text_document")
    assert len(ds) == 24 and ds[0].dtype == np.uint16
    for i, rec in enumerate(PRETRAIN):
        assert ds[i].tolist() == hf(rec["text"])["input_ids"] + [hf.eos_token_id]
    assert ds.document_indices.tolist() == list(range(25))


@pytest.mark.parametrize("handler,records,formats", [
    ("AlpacaStyleInstructionHandler", ALPACA, ["jsonl", "json", "parquet", "csv", "arrow"]),
    ("SharegptStyleInstructionHandler", SHAREGPT, ["jsonl", "json", "parquet", "arrow"]),
    ("OpenAIStyleInstructionHandler", OPENAI, ["jsonl", "json", "parquet", "arrow"]),
])
def test_instruction_handlers_every_format(tmp_path, capsys, tok, hf, handler, records, formats):
    for fmt in formats:
        src = write(tmp_path / fmt / f"in.{fmt}", records, fmt)
        prefix = tmp_path / fmt / "out" / "sft"
        rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                          "--handler-name", handler, "--seq-length", 4096)
        assert rc == 0, f"{fmt}: {err}"
        ids, mask, labels = (read(f"{prefix}_packed_{s}_document") for s in ("input_ids", "attention_mask", "labels"))
        assert len(ids) == len(mask) == len(labels) == len(records)
        for i, rec in enumerate(records):
            want = hf.apply_chat_template(messages_of(handler, rec), tokenize=False)
            assert hf.decode(ids[i]) == want, fmt
            assert ids[i].dtype == np.int32 and (mask[i] == 1).all()
            sup = labels[i] != -100
            assert (labels[i][sup] == ids[i][sup]).all()
            assert hf.decode(labels[i][sup]).endswith("<|im_end|>")


def test_general_instruction_handler_and_map_keys(tmp_path, capsys, tok, hf):
    recs = [{"q": r["instruction"], "ctx": r["input"], "a": r["output"]} for r in ALPACA]
    src = write(tmp_path / "in.csv", recs, "csv")
    for handler in ("GeneralInstructionHandler", "AlpacaStyleInstructionHandler"):
        prefix = tmp_path / handler
        rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                          "--handler-name", handler, "--map-keys", '{"prompt": "q", "query": "ctx", "response": "a"}')
        assert rc == 0, err
        ids = read(f"{prefix}_packed_input_ids_document")
        labels = read(f"{prefix}_packed_labels_document")
        assert hf.decode(labels[3][labels[3] != -100]) == ALPACA[3]["output"] + "<|im_end|>"
        assert ("### Instruction:" in hf.decode(ids[0])) == (handler == "GeneralInstructionHandler")


def test_pack_bins_boundaries_and_padding(tmp_path, capsys, tok, hf):
    src = write(tmp_path / "in.jsonl", SHAREGPT, "jsonl")
    rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "p",
                      "--handler-name", "SharegptStyleInstructionHandler", "--seq-length", 256, "--pack")
    assert rc == 0, err
    ids, mask, labels = (read(tmp_path / f"p_packed_{s}_document") for s in ("input_ids", "attention_mask", "labels"))
    assert 1 < len(ids) < len(SHAREGPT)
    rendered = sorted(hf.apply_chat_template(messages_of("SharegptStyleInstructionHandler", r), tokenize=False)
                      for r in SHAREGPT)
    found = []
    for b in range(len(ids)):
        x, m, y = ids[b], mask[b], labels[b]
        assert len(x) == len(m) == len(y) == 256
        k = m.max()
        # samples are marked 1..k in order, padding (mask 0) only at the end
        nz = m[m > 0]
        assert (np.diff(nz) >= 0).all() and set(nz.tolist()) == set(range(1, k + 1))
        assert (m[len(nz):] == 0).all()
        assert (x[m == 0] == hf.pad_token_id).all() and (y[m == 0] == -100).all()
        found += [hf.decode(x[m == j]) for j in range(1, k + 1)]
    assert sorted(found) == rendered  # every sample exactly once, whole


def test_truncation_is_counted(tmp_path, capsys, tok):
    src = write(tmp_path / "in.jsonl", ALPACA, "jsonl")
    rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "t",
                      "--handler-name", "AlpacaStyleInstructionHandler", "--seq-length", 40)
    assert rc == 0, err
    assert "truncated 24" in err
    assert (read(tmp_path / "t_packed_input_ids_document").sequence_lengths == 40).all()


BAD_CASES = [
    ("unparseable line", "jsonl", '{"text": "fine"}\n{"text": broken\n', "GeneralPretrainHandler",
     ":2: not valid JSON"),
    ("empty text", "jsonl", '{"text": "fine"}\n{"text": "   "}\n', "GeneralPretrainHandler", ":2: empty text"),
    ("missing column", "jsonl", json.dumps(ALPACA[0]) + "\n" + '{"instruction": "x"}\n',
     "AlpacaStyleInstructionHandler", ":2: missing column 'output'"),
    ("roles out of order", "jsonl", json.dumps(SHAREGPT[0]) + "\n" + json.dumps(
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}) + "\n",
     "SharegptStyleInstructionHandler", ":2: 'conversations'[0]: roles out of order"),
    ("bad record in parquet", "parquet", None, "AlpacaStyleInstructionHandler", ": record 2: empty 'output'"),
]


@pytest.mark.parametrize("case,fmt,content,handler,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_stops_with_location_and_no_outputs(tmp_path, capsys, tok, case, fmt, content, handler, message):
    path = tmp_path / f"in.{fmt}"
    if content is None:
        write(path, [ALPACA[0], dict(ALPACA[1], output="")], fmt)
    else:
        path.write_text(content)
    args = ["--input", path, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "out" / "x",
            "--handler-name", handler]
    rc, err = run_cli(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and message in lines[0], err
    assert not (tmp_path / "out").exists()
    rc, err = run_cli(capsys, *args, "--skip-bad-records")
    assert rc == 0, err
    assert f"skipped {path}" in err and "skipped 1" in err
    assert len(read(tmp_path / "out" / ("x_text_document" if handler.startswith("GeneralP")
                                         else "x_packed_input_ids_document"))) == 1


def test_cli_exit_code_and_old_outputs_kept(tmp_path, tok):
    """Through the installed entry point: a bad run leaves an earlier good output untouched."""
    good = write(tmp_path / "good.jsonl", PRETRAIN, "jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    base = [sys.executable, "-m", "ascendfactory", "preprocess", "--tokenizer-name-or-path", tok, "--output-prefix",
            str(tmp_path / "o"), "--handler-name", "GeneralPretrainHandler", "--workers", "2"]
    assert subprocess.run(base + ["--input", good], capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("o_*")}
    # --overwrite: a run that may replace them still keeps them when it fails
    r = subprocess.run(base + ["--input", str(bad), "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {bad}:2: missing key 'text' (keys: txt) (fix the record or pass " \
                               "--skip-bad-records)"
    assert {p.name: p.read_bytes() for p in tmp_path.glob("o_*")} == before


@pytest.mark.parametrize("args,message", [
    (["--handler-name", "NoSuchHandler"], "--handler-name NoSuchHandler: unknown"),
    (["--prompt-type", "chatml"], "--prompt-type chatml: unknown"),
    (["--map-keys", "{oops"], "--map-keys: not valid JSON"),
    (["--input", "/nonexistent/x.jsonl"], "--input /nonexistent/x.jsonl: no such file"),
])
def test_bad_flags(tmp_path, capsys, tok, args, message):
    src = write(tmp_path / "in.jsonl", ALPACA, "jsonl")
    base = {"--input": src, "--tokenizer-name-or-path": tok, "--output-prefix": tmp_path / "o",
            "--handler-name": "AlpacaStyleInstructionHandler"}
    base.update(dict(zip(args[::2], args[1::2])))
    rc, err = run_cli(capsys, *[x for kv in base.items() for x in kv])
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.glob("o_*")) == []


def test_workers_give_identical_output(tmp_path, capsys, tok):
    src = write(tmp_path / "in.jsonl", SHAREGPT * 20, "jsonl")
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                          "--handler-name", "SharegptStyleInstructionHandler", "--pack", "--seq-length", 512,
                          "--workers", workers)
        assert rc == 0, err
        outs.append([(tmp_path / f"w{workers}_packed_{s}_document.{e}").read_bytes()
                     for s in ("input_ids", "attention_mask", "labels") for e in ("bin", "idx")])
    assert outs[0] == outs[1]


def test_progress_lines_and_summary(tmp_path, capsys, tok, monkeypatch):
    from ascendfactory.data import preprocess

    monkeypatch.setattr(preprocess, "PROGRESS_EVERY_S", 0.0)
    src = write(tmp_path / "in.jsonl", PRETRAIN, "jsonl")
    rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "o",
                      "--handler-name", "GeneralPretrainHandler")
    assert rc == 0, err
    progress = [line for line in err.splitlines() if line.startswith("preprocess: 100% of input, 24 records")]
    assert progress and "records/s" in progress[0] and "M tokens/s" in progress[0]
    done = err.strip().splitlines()[-1]
    for field in ("records 24", "skipped 0", "truncated 0", "tokens ", "output_bytes "):
        assert field in done
    summary = json.loads((tmp_path / "o_preprocess_summary.json").read_text())
    assert summary["data_prefix"] == str(tmp_path / "o_text_document")
    assert summary["summary"]["records"] == 24


def test_auto_prompt_type_needs_a_chat_template(tmp_path, capsys, tok):
    import shutil

    bare = tmp_path / "bare-tok"
    shutil.copytree(tok, bare)
    (bare / "chat_template.jinja").unlink()
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = write(tmp_path / "in.jsonl", ALPACA, "jsonl")
    args = ["--input", src, "--tokenizer-name-or-path", bare, "--output-prefix", tmp_path / "o", "--handler-name",
            "AlpacaStyleInstructionHandler"]
    rc, err = run_cli(capsys, *args)
    assert rc == 2 and "has no chat_template" in err and "--prompt-type" in err
    rc, err = run_cli(capsys, *args, "--prompt-type", "qwen")
    assert rc == 0, err


def test_moss_handler(tmp_path, capsys, tok, hf):
    recs = [{"conversation_id": i, "meta_instruction": "You are MOSS.", "num_turns": 2,
             "chat": {"turn_2": {"Human": "<|Human|>: and again<eoh>\n", "MOSS": "<|MOSS|>: same<eom>\n"},
                      "turn_1": {"Human": f"<|Human|>: {r['instruction']}<eoh>\n",
                                 "MOSS": f"<|MOSS|>: {r['output']}<eom>\n"}}}
            for i, r in enumerate(ALPACA[:6])]
    src = write(tmp_path / "moss.jsonl", recs, "jsonl")
    prefix = tmp_path / "moss"
    rc, err = run_cli(capsys, "--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                      "--handler-name", "MOSSInstructionHandler", "--prompt-type", "qwen")
    assert rc == 0, err
    ids, labels = read(f"{prefix}_packed_input_ids_document"), read(f"{prefix}_packed_labels_document")
    for i, r in enumerate(ALPACA[:6]):
        msgs = [{"role": "system", "content": "You are MOSS."}, {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]}, {"role": "user", "content": "and again"},
                {"role": "assistant", "content": "same"}]
        assert hf.decode(ids[i]) == hf.apply_chat_template(msgs, tokenize=False)
        assert hf.decode(labels[i][labels[i] != -100]) == f"{r['output']}<|im_end|>same<|im_end|>"
    bad = write(tmp_path / "bad.jsonl", [{"chat": {"turn_1": {"Human": "hi"}}}], "jsonl")
    rc, err = run_cli(capsys, "--input", bad, "--tokenizer-name-or-path", tok, "--output-prefix", tmp_path / "b",
                      "--handler-name", "MOSSInstructionHandler")
    assert rc == 2 and "bad.jsonl:1" in err and "'MOSS'" in err
