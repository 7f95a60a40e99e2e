"""The `train` pipeline's preprocess stage: skip-if-done, its invalidation, and finding the data prefix."""

import os
import subprocess
import sys

import pytest

from ascendfactory.config.paths import run_paths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.data import stage
from ascendfactory.errors import UserError
from ascendfactory.tiny import make_tokenizer, write_instruction_data, write_pretrain_data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(make_tokenizer(tmp_path_factory.mktemp("tok") / "llama3", "llama3"))


def cfg_for(tmp_path, tok, **kw):
    base = dict(model_name_or_path=tok, output_dir=str(tmp_path / "run"), seq_len=128)
    return ExpConfig(**{**base, **kw})


def test_run_then_skip_until_an_input_changes(tmp_path, tok):
    data = write_instruction_data(tmp_path / "alpaca.jsonl", 16)
    cfg = cfg_for(tmp_path, tok, dataset=str(data))
    paths = run_paths(cfg)
    run, why = stage.decide(cfg, paths)
    assert run and "no preprocessed data" in why

    prefix = stage.run(cfg, paths)
    assert prefix == str(paths.processed_data_dir / "alpaca")
    assert stage.find_data_prefix(paths.processed_data_dir, "sft") == prefix
    run, why = stage.decide(cfg, paths)
    assert not run and "already preprocessed" in why

    # any option that changes the output invalidates it
    assert stage.decide(cfg.model_copy(update={"seq_len": 64}), paths) == (
        True, f"preprocessing options changed since {paths.processed_data_dir / 'alpaca'}_* was written")
    # the same for the dataset file and the tokenizer files (size or mtime)
    st = os.stat(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    run, why = stage.decide(cfg, paths)
    assert run and "dataset files changed" in why
    stage.run(cfg, paths)
    assert stage.decide(cfg, paths)[0] is False
    with open(os.path.join(tok, "tokenizer_config.json"), "a") as f:
        f.write("\n")
    run, why = stage.decide(cfg, paths)
    assert run and "tokenizer files changed" in why
    stage.run(cfg, paths)
    # a lost output file means the stage runs again
    os.unlink(f"{prefix}_packed_labels_document.bin")
    run, why = stage.decide(cfg, paths)
    assert run and "incomplete" in why


def test_pretrain_prefix_and_user_given_folder(tmp_path, tok):
    write_pretrain_data(tmp_path / "corpus" / "part1.jsonl", 16)
    write_pretrain_data(tmp_path / "corpus" / "part2.jsonl", 8)
    cfg = cfg_for(tmp_path, tok, dataset=str(tmp_path / "corpus"), stage="pt", handler_name="GeneralPretrainHandler")
    paths = run_paths(cfg)
    prefix = stage.run(cfg, paths)
    assert prefix == str(paths.processed_data_dir / "corpus_text_document")
    assert stage.find_data_prefix(paths.processed_data_dir, "pt") == prefix
    with pytest.raises(UserError, match="no preprocessed instruction data; expected <prefix>_packed_"):
        stage.find_data_prefix(paths.processed_data_dir, "sft")

    # a user-given processed_data_dir: stage skipped, prefix found by file names (no summary json needed)
    given = tmp_path / "given"
    given.mkdir()
    for ext in ("bin", "idx"):
        os.link(f"{prefix}.{ext}", given / f"mydata_text_document.{ext}")
    cfg2 = cfg_for(tmp_path, tok, processed_data_dir=str(given), stage="pt", handler_name="GeneralPretrainHandler")
    assert stage.decide(cfg2, run_paths(cfg2)) == (
        False, f"processed_data_dir given: training reads {given / 'mydata_text_document'}")
    assert stage.find_data_prefix(given, "pt") == str(given / "mydata_text_document")
    assert stage.find_data_prefix(given / "mydata_text_document", "pt") == str(given / "mydata_text_document")
    for ext in ("bin", "idx"):
        os.link(f"{prefix}.{ext}", given / f"other_text_document.{ext}")
    with pytest.raises(UserError, match="several datasets"):
        stage.find_data_prefix(given, "pt")
    with pytest.raises(UserError, match=f"processed_data_dir {tmp_path / 'empty'}: no such folder"):
        stage.find_data_prefix(tmp_path / "empty", "pt")
    (given / "other_text_document.bin").unlink()
    (given / "mydata_text_document.idx").unlink()
    with pytest.raises(UserError, match="other_text_document.bin is missing"):
        stage.find_data_prefix(given, "pt")


def test_decide_imports_no_torch_or_transformers(tmp_path, tok):
    data = write_instruction_data(tmp_path / "a.jsonl", 4)
    code = (
        "import sys\n"
        "from ascendfactory.config.schema import ExpConfig\n"
        "from ascendfactory.config.paths import run_paths\n"
        "from ascendfactory.data.stage import decide\n"
        f"cfg = ExpConfig(model_name_or_path={tok!r}, output_dir={str(tmp_path / 'run')!r}, dataset={str(data)!r})\n"
        "print(decide(cfg, run_paths(cfg)))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'megatron', 'datasets') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
    assert "no preprocessed data" in out
