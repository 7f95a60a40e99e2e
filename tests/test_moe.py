"""Mixture-of-Experts (SPEC.md section 8), phase 1: the three MoE families' facts, conversion with expert parallel
(EP rank folders, experts split by EP then TP, router / shared gate replicated), the bit-exact round trip at
TP2 PP2 EP2, logits equal to HF's at EP1, EP2 and TP2 x EP2 (torchrun, gloo), and the EP rules (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_convert_roundtrip import assert_identical, hf_tensors

from ascendfactory.ckpt.files import rank_file
from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf, read_checkpoint_layout
from ascendfactory.convert.verify import TOLERANCE, compare
from ascendfactory.families import FAMILIES
from ascendfactory.modelinfo import facts_from_config, read_model_facts
from ascendfactory.tiny import make_tiny_model, tiny_config, write_instruction_data

MOE = [fam.tiny.name for fam in FAMILIES if fam.tiny.config.get("num_experts_per_tok")]
CLI = [sys.executable, "-m", "ascendfactory"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("moe_hf")
    return {n: make_tiny_model(base / n, n, seed=3, **next(f.tiny.tests for f in FAMILIES if f.tiny.name == n))
            for n in MOE}


def _facts(family: str, **overrides):
    fam = next(f for f in FAMILIES if f.tiny.name == family)
    cfg = dict(tiny_config(family, **overrides).to_dict(), architectures=[fam.architectures[0]])
    return facts_from_config(cfg)


def test_moe_facts_follow_hf_config():
    """Experts (Qwen's num_experts, Mixtral's num_local_experts), top-k, expert and shared MLP sizes, which layers
    are MoE (mlp_only_layers, decoder_sparse_step) and the top-k renormalisation each HF model applies."""
    assert MOE == ["qwen3_moe", "qwen2_moe", "mixtral"]
    q3 = _facts("qwen3_moe", mlp_only_layers=[1])
    assert (q3.num_experts, q3.moe_topk, q3.moe_ffn_hidden_size, q3.moe_layers) == (4, 2, 32, (0, 2, 3))
    assert q3.norm_topk_prob and q3.shared_expert_size == 0 and q3.router_aux_loss_coef == 0.001
    assert not _facts("qwen3_moe", norm_topk_prob=False).norm_topk_prob
    assert _facts("qwen3_moe", decoder_sparse_step=2).moe_layers == (1, 3)
    q2 = _facts("qwen2_moe")
    assert (q2.shared_expert_size, q2.norm_topk_prob, q2.moe_layers, q2.qkv_bias) == (48, False, (0, 1, 2, 3), True)
    mx = _facts("mixtral")
    assert (mx.num_experts, mx.moe_ffn_hidden_size, mx.norm_topk_prob) == (4, 32, True)  # Mixtral always renormalises
    assert _facts("qwen2").num_experts == 0 and _facts("qwen2").moe_layers == ()


@pytest.mark.parametrize("family", MOE)
def test_roundtrip_tp2_pp2_ep2_bit_exact(moe_models, tmp_path, family):
    src = moe_models[family]
    assert hf_to_megatron(src, tmp_path / "mg", 2, 2, ep=2)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    ck = read_checkpoint_layout(tmp_path / "mg")
    assert (ck.tp, ck.pp, ck.ep, ck.layers) == (2, 2, 2, (2, 2))
    # the other way round too: EP 4 without PP (a lone folder suffix that is the EP rank)
    hf_to_megatron(src, tmp_path / "mg4", 1, 1, ep=4)
    assert sorted(p.name for p in (tmp_path / "mg4" / "iter_0000001").iterdir()) == [
        f"mp_rank_00_{e:03d}" for e in range(4)]
    assert read_checkpoint_layout(tmp_path / "mg4").ep == 4
    megatron_to_hf(tmp_path / "mg4", tmp_path / "hf4", src)
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf4"))


def test_ep_shards_follow_spec(moe_models, tmp_path):
    """TP2 PP2 EP2 rank files against SPEC.md section 8, written out independently of the tables: expert e on EP
    rank e // 2 as local expert e % 2, TP-split like a dense MLP; router and shared gate replicated; the shared
    expert split like a dense MLP; the EP size recorded in the args."""
    src = moe_models["qwen2_moe"]
    hf = hf_tensors(src)
    hf_to_megatron(src, tmp_path / "mg", 2, 2, ep=2)
    T = 2
    for p in range(2):
        for e in range(2):
            for t in range(T):
                f = rank_file(tmp_path / "mg", 1, t, p, 2, e, 2)
                assert f.parent.name == f"mp_rank_{t:02d}_{p:03d}_{e:03d}"
                ckpt = torch.load(f, weights_only=False)
                assert (ckpt["args"]["expert_model_parallel_size"], ckpt["args"]["num_experts"]) == (2, 4)
                sd = ckpt["model"]
                for j in range(2):
                    i, L, H = 2 * p + j, f"decoder.layers.{j}.mlp", f"model.layers.{2 * p + j}.mlp"
                    assert torch.equal(sd[f"{L}.router.weight"], hf[f"{H}.gate.weight"])
                    assert torch.equal(sd[f"{L}.shared_experts.gate_weight"], hf[f"{H}.shared_expert_gate.weight"])
                    gate, up = (hf[f"{H}.shared_expert.{x}_proj.weight"] for x in ("gate", "up"))
                    assert torch.equal(sd[f"{L}.shared_experts.linear_fc1.weight"],
                                       torch.cat([gate.chunk(T)[t], up.chunk(T)[t]]))
                    for k in range(2):
                        x = f"{H}.experts.{2 * e + k}"
                        gate, up = hf[f"{x}.gate_proj.weight"], hf[f"{x}.up_proj.weight"]
                        assert torch.equal(sd[f"{L}.experts.local_experts.{k}.linear_fc1.weight"],
                                           torch.cat([gate.chunk(T)[t], up.chunk(T)[t]])), (i, e, k)
                        assert torch.equal(sd[f"{L}.experts.local_experts.{k}.linear_fc2.weight"],
                                           hf[f"{x}.down_proj.weight"].chunk(T, dim=1)[t])
                    assert f"{L}.experts.local_experts.2.linear_fc1.weight" not in sd  # only its own 2 experts


@pytest.mark.slow
def test_logits_equal_hf_at_ep1_ep2_tp2ep2(moe_models, tmp_path):
    """megatron-core's MoE layer (local spec, SequentialMLP, allgather dispatcher) from the converted weights gives
    HF's logits for the three families (Qwen3-MoE with a dense layer, Qwen2-MoE with its gated shared expert and
    plain top-k weights, Mixtral), in one process and split over 2 and 4 gloo processes. Two experts swapped in one
    EP rank must show."""
    jobs, names = [], []
    for family in MOE:
        for tp, ep in ((1, 1), (1, 2), (2, 2)):
            mg = tmp_path / f"{family}-tp{tp}ep{ep}"
            hf_to_megatron(moe_models[family], mg, tp, 1, ep=ep)
            jobs.append({"hf_dir": str(moe_models[family]), "mg_dir": str(mg)})
            names.append(mg.name)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "mixtral-tp1ep2", bad)
    f = rank_file(bad, 1, 0, 0, 1, 1, 2)
    ckpt = torch.load(f, weights_only=False)
    sd, x = ckpt["model"], "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc1.weight"
    sd[x.format(0)], sd[x.format(1)] = sd[x.format(1)], sd[x.format(0)]
    torch.save(ckpt, f)
    jobs.append({"hf_dir": str(moe_models["mixtral"]), "mg_dir": str(bad)})

    results = compare(jobs, nproc=4)
    diffs = {n: r["max_abs_diff"] for n, r in zip(names, results)}
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    assert results[-1]["max_abs_diff"] > 1e-3


@pytest.mark.slow
def test_cli_hf2mg_ep_verify(moe_models, tmp_path):
    """`convert hf2mg --ep 2 --verify` (EP-suffixed folders, checked against HF), `mg2hf --verify` back."""
    src = moe_models["qwen3_moe"]
    r = subprocess.run(CLI + ["convert", "hf2mg", "--hf-dir", str(src), "--mg-dir", str(tmp_path / "mg"), "--ep", "2",
                              "--verify"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "hf2mg: [2/2] mp_rank_00_001" in r.stderr and "verify: OK" in r.stderr and "EP2" in r.stderr
    r = subprocess.run(CLI + ["convert", "mg2hf", "--mg-dir", str(tmp_path / "mg"), "--hf-dir", str(tmp_path / "hf"),
                              "--hf-config-dir", str(src), "--verify"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "verify: OK" in r.stderr
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def _run(args, timeout=120):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_hf2mg_bad_ep_exit_2(moe_models, tmp_path):
    line = _one_error_line(_run(["convert", "hf2mg", "--hf-dir", moe_models["mixtral"], "--mg-dir", tmp_path / "a",
                                 "--ep", "3"]))
    assert "--ep: 3 does not divide the 4 experts" in line
    dense = make_tiny_model(tmp_path / "dense", "qwen2", with_tokenizer=False, vocab_size=64)
    line = _one_error_line(_run(["convert", "hf2mg", "--hf-dir", dense, "--mg-dir", tmp_path / "b", "--ep", "2"]))
    assert "--ep: 2" in line and "Qwen2ForCausalLM has no experts" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def run_cfg(moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_cfg")
    data = write_instruction_data(root / "data.jsonl", n=16)

    def write(exp: dict, nproc: int = 2) -> Path:
        cfg = {"base": {"device": "cpu", "nproc_per_node": nproc, "seq_len": 64, "max_pe": 256,
                        "micro_batch_size": 1, "global_batch_size": 4, "train_iters": 2,
                        "tensor_model_parallel_size": 1, "prompt_type": "qwen"},
               "tiny": {"model_name_or_path": str(moe_models["qwen3_moe"]), "dataset": str(data),
                        "output_dir": str(root / "out"), "exp": exp}}
        path = root / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


def test_plan_shows_ep_and_expert_dp(run_cfg):
    r = _run(["plan", run_cfg({"expert-model-parallel-size": 2}, nproc=4), "tiny", "exp", "--json"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["layout"]["ep"], out["layout"]["expert_dp"], out["layout"]["dp"]) == (2, 2, 4)
    assert out["config"]["expert_model_parallel_size"] == 2
    assert out["config"]["moe_token_dispatcher_type"] == "auto" and out["config"]["moe_grouped_gemm"] == "auto"
    assert "converted_hf2mg_weight_TP1PP1EP2" in out["paths"]["converted_ckpt_dir"]
    r = _run(["plan", run_cfg({"ep": 2}), "tiny", "exp"])
    assert r.returncode == 0 and "EP 2  expert-DP 1" in r.stdout, r.stderr


@pytest.mark.parametrize("exp,nproc,want", [
    ({"expert_model_parallel_size": 3, "global_batch_size": 3}, 3,
     "expert_model_parallel_size (3) must divide num_experts (4, from "),
    ({"expert_model_parallel_size": 4}, 2, "expert_model_parallel_size (4) must divide data-parallel size x "
                                           "context_parallel_size (2 x 1 = 2)"),
    ({"expert_model_parallel_size": 0}, 2, "expert_model_parallel_size = 0: must be at least 1"),
    ({"tensor_model_parallel_size": 2}, 2, "sequence_parallel: an MoE model (Qwen3MoeForCausalLM) at "
                                           "tensor_model_parallel_size 2 needs sequence_parallel: true; set it"),
    # grouped GEMM (engine/moe.py): GroupedMLP computes in bf16 only, has no per-expert linears for LoRA, and needs
    # a grouped matmul (the CPU's reference; none on NPU yet, grouped_gemm on CUDA)
    ({"moe_grouped_gemm": True}, 2, "moe_grouped_gemm: true needs precision: bf16 (megatron-core's GroupedMLP "
                                    "computes in bf16 only), the run's is fp32 (auto on cpu); set precision: bf16 or "
                                    "moe_grouped_gemm: false"),
    ({"moe_grouped_gemm": True, "precision": "bf16", "finetuning_type": "lora", "lora_target_modules": "linear_qkv "
      "linear_fc2"}, 2, "moe_grouped_gemm: true cannot take finetuning_type lora on the experts (lora_target_modules "
                        "linear_fc2): GroupedMLP has no per-expert linears to adapt; set moe_grouped_gemm: false, or "
                        "leave linear_fc1 and linear_fc2 out of lora_target_modules"),
    ({"moe_grouped_gemm": True, "precision": "bf16", "device": "npu"}, 2,
     "moe_grouped_gemm: true needs a grouped matmul on the device (npu: none is provided for it yet); set "
     "moe_grouped_gemm: auto or false"),
])
def test_ep_rules_exit_2_naming_both(run_cfg, exp, nproc, want):
    line = _one_error_line(_run(["plan", run_cfg(exp, nproc), "tiny", "exp"]))
    assert want in line


def test_ep_checkpoint_at_another_ep_exit_2(run_cfg, moe_models, tmp_path):
    """A checkpoint converted at EP 2 given to a full resume at EP 1 (its lone folder suffix is not a PP rank: the
    args say), and the other way round."""
    hf_to_megatron(moe_models["qwen3_moe"], tmp_path / "ep2", 1, 1, ep=2)
    line = _one_error_line(_run(["plan", run_cfg({"user_converted_ckpt_path": str(tmp_path / "ep2"),
                                                  "ckpt_load_type": 2}), "tiny", "exp"]))
    assert "checkpoint layout TP1 PP1 EP2 differs from the run's TP1 PP1 EP1" in line and "--ep 1" in line
    hf_to_megatron(moe_models["qwen3_moe"], tmp_path / "ep1", 1, 1)
    line = _one_error_line(_run(["train", run_cfg({"user_converted_ckpt_path": str(tmp_path / "ep1"), "ep": 2,
                                                   "ckpt_load_type": 2}), "tiny", "exp"]))
    assert "checkpoint layout TP1 PP1 EP1 differs from the run's TP1 PP1 EP2" in line


def test_read_facts_of_the_moe_test_models(moe_models):
    """The saved tiny models (transformers' own config.json) read back as the records say."""
    assert read_model_facts(moe_models["qwen3_moe"]).moe_layers == (0, 2, 3)
    assert read_model_facts(moe_models["mixtral"]).num_experts == 4
