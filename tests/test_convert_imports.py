"""Conversion start-up: hf2mg and mg2hf of our own checkpoints never import megatron-core (seconds of start-up);
a checkpoint whose args hold megatron-core's AttnBackend enum (Megatron / MindSpeed-LLM) still loads, in a
process that has not imported megatron-core yet."""

import argparse
import subprocess
import sys

import pytest
import torch

from ascendfactory.ckpt.files import rank_file

pytestmark = pytest.mark.slow  # fresh interpreters per case: the full suite only


def _run(code: str, *args) -> str:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_convert_both_ways_without_megatron_core(tiny_models, tmp_path):
    code = ("import sys; from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf\n"
            "hf_to_megatron(sys.argv[1], sys.argv[2], 2, 2); megatron_to_hf(sys.argv[2], sys.argv[3], sys.argv[1])\n"
            "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))")
    out = _run(code, tiny_models["qwen2"], tmp_path / "mg", tmp_path / "hf")
    assert "IMPORTED []" in out
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


def test_megatron_args_load_in_a_fresh_process(tiny_models, tmp_path):
    from megatron.core.transformer.enums import AttnBackend

    from ascendfactory.convert.api import hf_to_megatron

    hf_to_megatron(tiny_models["qwen2"], tmp_path / "mg", 1, 1)
    f = rank_file(tmp_path / "mg", 1, 0, 0, 1)
    content = torch.load(f, weights_only=False)
    content["args"] = argparse.Namespace(**content["args"], attention_backend=AttnBackend.flash)
    torch.save(content, f)
    out = _run("import sys; from pathlib import Path; from ascendfactory.ckpt.reader import rank_args\n"
               "print('BACKEND', rank_args(Path(sys.argv[1]))['attention_backend'].name)", f)
    assert "BACKEND flash" in out
