"""HF logits (fp32, CPU) == megatron-core GPTModel logits from the converted checkpoint, at TP1/PP1, TP2 and PP2
(torchrun, 2 gloo processes), for every family; `--verify` passes on a good conversion and fails loudly on a bad one."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from _convert_models import FAMILIES

from ascendfactory.ckpt.files import rank_file
from ascendfactory.convert.api import VerificationFailed, hf_to_megatron, verify_conversion
from ascendfactory.convert.verify import TOLERANCE, compare

pytestmark = pytest.mark.slow  # megatron models at several layouts (torchrun): the full suite only

LAYOUTS = {"tp1pp1": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, None)}


def test_logits_every_family_and_layout(tiny_models, tmp_path):
    jobs, names = [], []
    for family in FAMILIES:
        for lname, (tp, pp, nll) in LAYOUTS.items():
            mg = tmp_path / f"{family}-{lname}"
            hf_to_megatron(tiny_models[family], mg, tp, pp, nll)
            jobs.append({"hf_dir": str(tiny_models[family]), "mg_dir": str(mg)})
            names.append(f"{family} {lname}")
    # uneven split (megatron-core pipeline layout) and a padded vocabulary split over TP
    hf_to_megatron(tiny_models["qwen2"], tmp_path / "uneven", 1, 2, "3,1")
    hf_to_megatron(tiny_models["llama"], tmp_path / "padded", 2, 1, make_vocab_size_divisible_by=64)
    jobs += [{"hf_dir": str(tiny_models["qwen2"]), "mg_dir": str(tmp_path / "uneven")},
             {"hf_dir": str(tiny_models["llama"]), "mg_dir": str(tmp_path / "padded")}]
    names += ["qwen2 pp2 uneven 3,1", "llama tp2 padded vocab"]
    # the comparison must be able to fail: one weight nudged in a TP2 rank
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "mistral-tp2", bad)
    f = rank_file(bad, 1, 1, 0, 1)
    ckpt = torch.load(f, weights_only=False)
    ckpt["model"]["decoder.layers.2.mlp.linear_fc2.weight"][0, 0] += 0.5
    torch.save(ckpt, f)
    jobs.append({"hf_dir": str(tiny_models["mistral"]), "mg_dir": str(bad)})

    results = compare(jobs, nproc=2)
    diffs = {n: r["max_abs_diff"] for n, r in zip(names, results)}
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    assert results[-1]["max_abs_diff"] > 1e-3


def test_verify_fails_loudly_on_mismatch(tiny_models, tmp_path):
    hf_to_megatron(tiny_models["qwen3"], tmp_path / "mg", 1, 1)
    f = rank_file(tmp_path / "mg", 1, 0, 0, 1)
    ckpt = torch.load(f, weights_only=False)
    ckpt["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] *= 1.5  # a q-norm mix-up
    torch.save(ckpt, f)
    with pytest.raises(VerificationFailed, match="differ"):
        verify_conversion(tiny_models["qwen3"], tmp_path / "mg")


def test_cli_verify(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    cli = [sys.executable, "-m", "ascendfactory", "convert"]
    r = subprocess.run(cli + ["hf2mg", "--hf-dir", str(src), "--mg-dir", str(tmp_path / "mg"), "--tp", "2",
                              "--verify"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "verify: OK" in r.stderr and "hf2mg: [2/2] mp_rank_01" in r.stderr
    r = subprocess.run(cli + ["mg2hf", "--mg-dir", str(tmp_path / "mg"), "--hf-dir", str(tmp_path / "hf"),
                              "--hf-config-dir", str(src), "--dtype", "bf16", "--verify"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "verify: OK" in r.stderr and "mg2hf: wrote" in r.stderr
