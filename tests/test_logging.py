"""The one output format (ascendfactory.logs): which lines go to stdout and stderr, with which prefix, and a
training worker's console (rank 0, and every rank's errors) versus its log file (everything)."""

from __future__ import annotations

import logging
import re

import pytest

from ascendfactory import logs


@pytest.fixture
def console():
    logs.setup()
    root = logging.getLogger(logs.ROOT)
    before = list(root.handlers)
    yield root
    for h in root.handlers[:]:
        if h not in before and isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    logs.setup()  # rank 0 again for the tests after this one


def test_each_kind_of_line_keeps_its_text_and_stream(console, capsys):
    logging.getLogger(logs.RUN).info("convert: skipped (done)")
    logging.getLogger(logs.TRAIN).info("saved checkpoint iteration 4")
    logging.getLogger("ascendfactory.progress").info("hf2mg: [1/2] mp_rank_00")
    logging.getLogger("ascendfactory.engine.checkpoint").warning("auto-resume skips iter_0000008")
    logging.getLogger("ascendfactory.cli").error("first line\nsecond line")
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\[ascendfactory\] \d\d:\d\d:\d\d convert: skipped \(done\)\n"
                        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] saved checkpoint iteration 4\n", out), out
    assert err == ("hf2mg: [1/2] mp_rank_00\nwarning: auto-resume skips iter_0000008\n"
                   "error: first line\nerror: second line\n")


def test_worker_console_shows_rank_0_and_every_error_its_file_everything(console, capsys, tmp_path):
    logs.setup(rank=1)
    logs.to_file(tmp_path / "train_rank_001.log")
    train = logging.getLogger(logs.TRAIN)
    train.info("iteration 1")
    train.warning("slow save")
    logging.getLogger("ascendfactory.engine").error("cannot write checkpoint")
    out, err = capsys.readouterr()
    assert out == "" and err == "error: cannot write checkpoint\n"
    lines = (tmp_path / "train_rank_001.log").read_text().splitlines()
    assert re.fullmatch(r"\[[\d: -]+\] iteration 1", lines[0]), lines
    assert lines[1:] == ["warning: slow save", "error: cannot write checkpoint"]
