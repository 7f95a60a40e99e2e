"""SDPA core attention (engine/attention.py) == megatron-core's DotProductAttention, fp32: causal (no mask
tensor) and the trainer's packed block-diagonal masks, GQA 4 heads / 2 groups, at TP1 and TP2 (2 gloo
processes), outputs and gradients; dropout in megatron's RNG tracker; fallback to the original class;
checkpoint keys unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _engine as E
import pytest

pytestmark = pytest.mark.slow  # torchrun workers: the full suite only

TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention") / "results.json"
    worker = Path(__file__).with_name("_attention_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(E.free_port()), str(worker), str(out)]
    proc = subprocess.run(cmd, check=False, env=E.engine_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", ["causal", "packed", "packed_repeated_kv"])
def test_matches_dot_product_attention(results, tp, case):
    r = results[f"tp{tp}"][case]
    assert r["shape"] == [32, 3, 4 // tp * 16]  # [sq, b, heads of this rank x hn]
    assert r["out"] <= TOL and r["grad"] <= TOL, r


@pytest.mark.parametrize("tp", [1, 2])
def test_unsupported_softmax_falls_back_to_the_original(results, tp):
    r = results[f"tp{tp}"]
    assert r["fallback"]["out"] <= TOL and r["fallback"]["grad"] <= TOL, r["fallback"]
    assert r["off_by_one_vs_vanilla"] > 1e-3  # the fallback case computes something SDPA would not


@pytest.mark.parametrize("tp", [1, 2])
def test_dropout_in_the_tracker_stream(results, tp):
    r = results[f"tp{tp}"]
    assert r["dropout_repeatable"] and r["default_rng_untouched"]
    assert r["dropout_changes_output"] > 1e-2
    assert r["dropout_eval_diff"] == 0.0


def test_checkpoint_keys_unchanged(results):
    assert results["state_dict_keys_match"]
