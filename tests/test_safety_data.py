"""Data and disk safety: `preprocess` never replaces outputs it did not write, records over max_record_mb are bad
records read no further than the limit, odd inputs (FIFO, /dev/null, unreadable, deeply nested JSON) are one line
with exit 2, and a full disk in preprocess / convert hf2mg / mg2hf is one line with exit 1 and nothing left behind."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ascendfactory.config.paths import run_paths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.convert.api import hf_to_megatron
from ascendfactory.data import stage
from ascendfactory.errors import UserError
from ascendfactory.tiny import corpus_text, make_tokenizer

pytestmark = pytest.mark.slow  # CLI subprocesses (tokenizers, converters) per case: the full suite only

CLI = [sys.executable, "-m", "ascendfactory"]
FSIZE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(make_tokenizer(tmp_path_factory.mktemp("tok") / "qwen", "qwen"))


def jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def preprocess(tok, src, prefix, *extra, **run) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["preprocess", "--input", str(src), "--tokenizer-name-or-path", tok, "--output-prefix",
                                 str(prefix), "--handler-name", "GeneralPretrainHandler", *map(str, extra)],
                          capture_output=True, text=True, timeout=300, **run)


def one_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ outputs of another run are never replaced


def test_preprocess_refuses_outputs_it_did_not_write(tmp_path, tok):
    out = tmp_path / "out"
    first = jsonl(tmp_path / "a.jsonl", corpus_text(2))
    assert preprocess(tok, first, out / "p").returncode == 0
    kept = files_of(out)

    other = jsonl(tmp_path / "b.jsonl", ["something else entirely"] * 3)
    err = one_error(preprocess(tok, other, out / "p"))
    assert f"--output-prefix {out / 'p'}: {out / 'p_text_document.bin'} already exists" in err
    assert "choose another prefix, or pass --overwrite" in err
    assert files_of(out) == kept

    # the same preprocessing again (our own summary, same inputs and options) is simply redone
    assert preprocess(tok, first, out / "p").returncode == 0
    assert {k: v for k, v in files_of(out).items() if "summary" not in k} == \
        {k: v for k, v in kept.items() if "summary" not in k}  # (the summary's timings differ)
    # --overwrite replaces
    assert preprocess(tok, other, out / "p", "--overwrite").returncode == 0
    assert files_of(out)["p_text_document.bin"] != kept["p_text_document.bin"]

    # files of the prefix written by another tool (no summary) are the user's too
    (out / "q_text_document.idx").write_bytes(b"not ours")
    err = one_error(preprocess(tok, first, out / "q"))
    assert f"{out / 'q_text_document.idx'} already exists" in err
    assert (out / "q_text_document.idx").read_bytes() == b"not ours"
    assert not list(out.glob("q_*.bin*"))


# ------------------------------------------------------------------ record size limit


def test_record_over_the_limit_is_a_bad_record(tmp_path, tok):
    src = tmp_path / "in.jsonl"
    big = "word " * (3 * 2**20 // 5)  # 3 MB of text
    jsonl(src, ["a small record", big, "another small one"])
    err = one_error(preprocess(tok, src, tmp_path / "o", "--max-record-mb", 1))
    assert f"error: {src}:2: record of 3.0 MB, over the limit of 1.0 MB (--max-record-mb)" in err
    assert "--skip-bad-records" in err
    assert not list(tmp_path.glob("o_*"))

    r = preprocess(tok, src, tmp_path / "o", "--max-record-mb", 1, "--skip-bad-records")
    assert r.returncode == 0, r.stderr
    assert f"skipped {src}:2: record of 3.0 MB" in r.stderr and "records 2, skipped 1" in r.stderr
    # under the limit it is an ordinary record
    assert preprocess(tok, src, tmp_path / "p", "--max-record-mb", 4).returncode == 0
    for bad in (0, "inf"):
        assert f"--max-record-mb {float(bad)}: must be a number above 0" in one_error(
            preprocess(tok, src, tmp_path / "p", "--max-record-mb", bad))


def test_record_limit_applies_to_parquet_records(tmp_path, tok):
    import datasets

    src = tmp_path / "in.parquet"
    datasets.Dataset.from_list([{"text": "small"}, {"text": "é" * (2**20)}]).to_parquet(str(src))  # 2 MB UTF-8
    err = one_error(preprocess(tok, src, tmp_path / "o", "--max-record-mb", 1.5))
    assert f"error: {src}: record 2: record of 2.0 MB, over the limit of 1.5 MB" in err


PEAK_RSS = """
import resource, sys
from ascendfactory.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_rss_mb(tok, src, prefix) -> int:
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, "preprocess", "--input", str(src), "--tokenizer-name-or-path",
                        tok, "--output-prefix", str(prefix), "--handler-name", "GeneralPretrainHandler",
                        "--skip-bad-records"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("peak_rss_mb")[-1])


def test_a_50_mb_record_is_skipped_in_bounded_memory(tmp_path, tok):
    small = jsonl(tmp_path / "small.jsonl", corpus_text(1))
    huge = tmp_path / "huge.jsonl"
    with huge.open("w") as f:
        f.write(json.dumps({"text": "first"}) + "\n")
        f.write('{"text": "' + "tokens " * (50 * 2**20 // 7) + '"}\n')
        f.write(json.dumps({"text": "last"}) + "\n")
    base = _peak_rss_mb(tok, small, tmp_path / "s")
    peak = _peak_rss_mb(tok, huge, tmp_path / "h")
    # the line is read up to the 16 MB limit, never whole (50 MB of bytes, then as much again parsed, and
    # gigabytes tokenized: 10.7 GB before the limit existed)
    assert peak - base < 64, (base, peak)
    summary = json.loads((tmp_path / "h_preprocess_summary.json").read_text())["summary"]
    assert summary["records"] == 2 and summary["skipped"] == 1


# ------------------------------------------------------------------ odd inputs


def test_deeply_nested_json_is_a_bad_record(tmp_path, tok):
    src = tmp_path / "deep.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    err = one_error(preprocess(tok, src, tmp_path / "o"))
    assert err.startswith(f"error: {src}:2: JSON nested too deeply (fix the record or pass --skip-bad-records)")
    r = preprocess(tok, src, tmp_path / "o", "--skip-bad-records")
    assert r.returncode == 0 and "skipped 1" in r.stderr, r.stderr


def test_fifo_and_device_are_refused(tmp_path, tok):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/null")):
        err = one_error(preprocess(tok, src, tmp_path / "o"))  # a FIFO with no writer would block for ever
        assert f"error: --input {src}: not a regular file or folder" in err
    assert not list(tmp_path.glob("o_*"))


def test_train_names_the_yaml_keys(tmp_path, tok):
    """From `train` the same problems name what the YAML says (dataset, skip_bad_records, max_record_mb)."""
    cfg = ExpConfig(model_name_or_path=tok, output_dir=str(tmp_path / "run"), dataset="/dev/null",
                    handler_name="GeneralPretrainHandler")
    with pytest.raises(UserError, match=r"^dataset /dev/null: not a regular file or folder"):
        stage.run(cfg, run_paths(cfg))
    src = jsonl(tmp_path / "in.jsonl", ["small", "x" * (2 * 2**20)])
    cfg = cfg.model_copy(update={"dataset": str(src), "max_record_mb": 1})
    with pytest.raises(UserError, match=r":2: record of 2.0 MB, over the limit of 1.0 MB \(max_record_mb\) "
                                        r"\(fix the record or set skip_bad_records: true\)$"):
        stage.run(cfg, run_paths(cfg))
    cfg = cfg.model_copy(update={"handler_name": "AlpacaStyleInstructionHandler", "map_keys": {"bogus": "x"}})
    with pytest.raises(UserError, match=r"^map_keys: unknown key\(s\) bogus"):
        stage.run(cfg, run_paths(cfg))
    cfg = cfg.model_copy(update={"map_keys": None, "prompt_type": "chatml"})
    with pytest.raises(UserError, match=r"^prompt_type chatml: unknown"):
        stage.run(cfg, run_paths(cfg))


def test_unreadable_input_and_unwritable_output(tmp_path, tok):
    # as root, permissions only bind once CAP_DAC_OVERRIDE is gone
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv")
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []

    def run(src, prefix):
        return subprocess.run(as_user + CLI + ["preprocess", "--input", str(src), "--tokenizer-name-or-path", tok,
                                               "--output-prefix", str(prefix), "--handler-name",
                                               "GeneralPretrainHandler"], capture_output=True, text=True, timeout=300)

    src = jsonl(tmp_path / "in.jsonl", corpus_text(1))
    src.chmod(0)
    assert f"error: {src}: cannot read (Permission denied)" in one_error(run(src, tmp_path / "o"))
    assert not list(tmp_path.glob("o_*"))
    src.chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    err = one_error(run(src, locked / "o"))
    assert f"error: {locked / 'o'}: cannot write there (Permission denied); choose a writable folder" in err
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ a full disk


def _limit_file_size():
    # Writes past 64 KiB fail with EFBIG (Python ignores SIGXFSZ): a full disk, as seen by the writer.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def _disk_full(r: subprocess.CompletedProcess, output: str) -> None:
    err = one_error(r, code=1)
    assert err.startswith(f"error: {output}: cannot write: the file size limit was hit (File too large)"), err
    assert "free space or raise the limit" in err


def test_disk_full_in_preprocess(tmp_path, tok):
    src = jsonl(tmp_path / "in.jsonl", corpus_text(2000))  # about 160 KB of uint16 tokens
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    r = preprocess(tok, src, out / "p", preexec_fn=_limit_file_size)
    _disk_full(r, f"{out / 'p'}_*")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # no outputs, no temporary files
    assert preprocess(tok, src, out / "p").returncode == 0  # and nothing in the way of a run with space


def test_disk_full_in_hf2mg(tmp_path, tiny_models):
    mg = tmp_path / "mg"
    r = subprocess.run(CLI + ["convert", "hf2mg", "--hf-dir", str(tiny_models["llama"]), "--mg-dir", str(mg)],
                       capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    _disk_full(r, f"--mg-dir {mg}")
    assert list(tmp_path.iterdir()) == []  # no target, no staging folder


def test_disk_full_in_mg2hf(tmp_path, tiny_models):
    mg = tmp_path / "mg"
    hf_to_megatron(tiny_models["llama"], mg, 1, 1)
    hf = tmp_path / "hf"
    r = subprocess.run(CLI + ["convert", "mg2hf", "--mg-dir", str(mg), "--hf-dir", str(hf), "--hf-config-dir",
                              str(tiny_models["llama"])],
                       capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    _disk_full(r, f"--hf-dir {hf}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]
