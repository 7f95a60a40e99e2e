"""torch_dist test checkpoints written by megatron-core itself (tests/_dist_worker.py under torchrun, gloo), with
the legacy checkpoints they were saved from; built once per test session (a session fixture of conftest.py,
for test_dist_read.py and test_convert_reshard.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import _engine as E
import pytest

WORKER = Path(__file__).with_name("_dist_worker.py")


def run_worker(jobs: list[dict], nproc: int, work: Path) -> None:
    jobs_file = work / f"jobs-{len(list(work.glob('jobs-*')))}.json"
    jobs_file.write_text(json.dumps([{k: str(v) for k, v in j.items()} for j in jobs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(E.free_port()), str(WORKER), str(jobs_file)]
    proc = subprocess.run(cmd, env=E.engine_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="session")
def dist_ckpts(tmp_path_factory) -> dict[str, Path]:
    """dense: tiny Qwen2 (tied embeddings, vocabulary padded) at TP2 PP2; moe: tiny Qwen3-MoE (4 experts, a dense
    layer between MoE ones) at TP2 EP2. `<kind>_hf`, `<kind>_legacy` (hf2mg) and `<kind>_dist` (megatron-core's
    dist_checkpointing.save of the GPTModel holding the legacy weights: layers stacked for the dense model, one
    key per layer for the MoE one)."""
    from ascendfactory.convert.api import hf_to_megatron
    from ascendfactory.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("dist_ckpts")
    made = {
        "dense_hf": make_tiny_model(root / "qwen2", "qwen2", seed=1, tie_word_embeddings=True),
        "moe_hf": make_tiny_model(root / "qwen3_moe", "qwen3_moe", seed=1, mlp_only_layers=[1]),
    }
    hf_to_megatron(made["dense_hf"], root / "dense_legacy", 2, 2, make_vocab_size_divisible_by=4)
    hf_to_megatron(made["moe_hf"], root / "moe_legacy", 2, 1, ep=2)
    for kind in ("dense", "moe"):
        made[f"{kind}_legacy"] = root / f"{kind}_legacy"
        made[f"{kind}_dist"] = root / f"{kind}_dist"
    run_worker([{"mode": "save", "legacy": made[f"{k}_legacy"], "hf_dir": made[f"{k}_hf"],
                 "out": made[f"{k}_dist"]} for k in ("dense", "moe")], 4, root)
    return made


def rank_states(mg_dir) -> dict:
    """Every rank's model tensors (adapters as saved), by (tp, pp, ep) rank."""
    from ascendfactory.ckpt.reader import read_checkpoint_layout

    ck = read_checkpoint_layout(mg_dir)
    return {(t, p, e): dict(ck.state(t, p, e, fold_adapters=False))
            for t in range(ck.tp) for p in range(ck.pp) for e in range(ck.ep)}


def assert_same_tensors(a: dict, b: dict, where="") -> None:
    """Same names, dtypes and bytes."""
    import torch

    assert a.keys() == b.keys(), (where, a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (where, k)


def assert_same_checkpoint(mg_a, mg_b) -> None:
    """Same layout, and every rank's tensors the same bytes."""
    a, b = rank_states(mg_a), rank_states(mg_b)
    assert a.keys() == b.keys()
    for rank in a:
        assert_same_tensors(a[rank], b[rank], rank)


def hf_tensors(hf_dir) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out
