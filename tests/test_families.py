"""The family registry and the mapping kinds on real tensors read from real safetensors files: every kind's shard /
merge round trip and split dimension, GLM's already-fused gate/up, an expert row (`{e}`) over TP x PP x EP, the
LoRA adapter split against the merged weights, the rank folder names with EP, and the traits reaching megatron-core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ascendfactory.ckpt.files import layout_of, rank_dir_name, rank_file
from ascendfactory.convert.hfread import SafetensorsReader
from ascendfactory.families import ARCHITECTURES, FAMILIES, LAYER, Rule, hf_linear_owners, stage_items
from ascendfactory.layout import ShardPlan as Layout
from ascendfactory.modelinfo import facts_from_config, read_model_facts
from ascendfactory.sharding import (
    COLUMN_PARALLEL,
    FUSED_GATE_UP,
    FUSED_QKV,
    REPLICATED,
    ROW_PARALLEL,
    VOCAB_ROWS,
)
from ascendfactory.tiny import tiny_config

# nh 4 heads, ng 2 kv groups, head dim 4: q 16 rows, k / v 8 rows; H 8, F 12, vocab 10 (padded to 12 at TP 2)
FACTS = facts_from_config({"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 4, "num_key_value_heads": 2,
                           "head_dim": 4, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 4,
                           "vocab_size": 10})


def _reader(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> SafetensorsReader:
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    return SafetensorsReader(tmp_path)


def _layout(tp: int, pp: int = 1, padded: int = 10) -> Layout:
    return Layout(tp, pp, (4 // pp,) * pp, 10, padded)


def _roundtrip(kind, names, tensors, tmp_path, tp, padded=10):
    read = _reader(tmp_path, tensors)
    shards = [kind.shard(names, read, FACTS, _layout(tp, padded=padded), r) for r in range(tp)]
    return shards, kind.merge(names, shards, FACTS, 10)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_parallel_split_the_megatron_dims(tmp_path, tp):
    w = torch.randn(12, 8)
    shards, back = _roundtrip(COLUMN_PARALLEL, ["w"], {"w": w}, tmp_path / "col", tp)
    assert all(torch.equal(s, c) for s, c in zip(shards, w.chunk(tp, dim=0))) and torch.equal(back["w"], w)
    shards, back = _roundtrip(ROW_PARALLEL, ["w"], {"w": w}, tmp_path / "row", tp)
    assert all(torch.equal(s, c) for s, c in zip(shards, w.chunk(tp, dim=1))) and torch.equal(back["w"], w)
    shards, back = _roundtrip(REPLICATED, ["n"], {"n": w[0]}, tmp_path / "rep", tp)
    assert all(torch.equal(s, w[0]) for s in shards) and torch.equal(back["n"], w[0])


def test_vocab_rows_pad_and_trim(tmp_path):
    emb = torch.randn(10, 8)
    shards, back = _roundtrip(VOCAB_ROWS, ["e"], {"e": emb}, tmp_path, 2, padded=12)
    assert [s.shape[0] for s in shards] == [6, 6] and not shards[1][4:].any()
    assert torch.equal(back["e"], emb)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_gqa_interleave(tmp_path, tp):
    q, k, v = torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8)
    names = ["q", "k", "v"]
    shards, back = _roundtrip(FUSED_QKV, names, dict(zip(names, (q, k, v))), tmp_path, tp)
    full = torch.cat([q.reshape(2, 8, 8), k.reshape(2, 4, 8), v.reshape(2, 4, 8)], dim=1).reshape(-1, 8)
    assert all(torch.equal(s, c) for s, c in zip(shards, full.chunk(tp)))
    assert all(torch.equal(back[n], t) for n, t in zip(names, (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_gate_up_from_two_tensors_or_one_fused(tmp_path, tp):
    gate, up = torch.randn(12, 8), torch.randn(12, 8)
    two, back2 = _roundtrip(FUSED_GATE_UP, ["g", "u"], {"g": gate, "u": up}, tmp_path / "two", tp)
    # GLM stores gate_up_proj [2F, H], gate rows first: the same Megatron shards, and back to the one tensor
    one, back1 = _roundtrip(FUSED_GATE_UP, ["gu"], {"gu": torch.cat([gate, up])}, tmp_path / "one", tp)
    for r in range(tp):
        want = torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
        assert torch.equal(two[r], want) and torch.equal(one[r], want)
    assert torch.equal(back2["g"], gate) and torch.equal(back2["u"], up)
    assert list(back1) == ["gu"] and torch.equal(back1["gu"], torch.cat([gate, up]))


@pytest.mark.parametrize("kind,parts", [(FUSED_QKV, {"q": 16, "k": 8, "v": 8}), (FUSED_GATE_UP, {"g": 12, "u": 12}),
                                        (FUSED_GATE_UP, {"gu": 24}), (COLUMN_PARALLEL, {"c": 12})])
def test_column_parallel_adapter_split(kind, parts):
    """B is cut over TP 2 like the weight (the kind's own shard); the split gives each HF linear the whole A and
    exactly its own rows of B, so B_n A is that linear's part of the fused delta."""
    a = torch.randn(3, 8)
    hf_b = {n: torch.randn(rows, 3) for n, rows in parts.items()}
    names = list(parts)
    b_shards = [kind.shard(names, _InMemory(hf_b), FACTS, _layout(2), r) for r in range(2)]
    pairs = kind.split_adapter(names, [a, a], b_shards, FACTS)
    assert list(pairs) == names
    assert all(torch.equal(pairs[n][0], a) and torch.equal(pairs[n][1], hf_b[n]) for n in names)


def test_row_parallel_adapter_split_and_no_split_for_norms():
    a, b = torch.randn(3, 12), torch.randn(8, 3)
    ((name, (a_full, b_full)),) = ROW_PARALLEL.split_adapter(["o"], list(a.chunk(2, dim=1)), [b, b], FACTS).items()
    assert name == "o" and torch.equal(a_full, a) and torch.equal(b_full, b)
    with pytest.raises(ValueError, match="no LoRA adapter split for a replicated tensor"):
        REPLICATED.split_adapter(["n"], [a], [b], FACTS)


class _InMemory(dict):
    """sharding.Reader over a dict (the adapter B above is not a file)."""

    def shape(self, name):
        return tuple(self[name].shape)

    def __call__(self, name, rows=None, cols=None):
        t = self[name]
        return t[rows[0]:rows[1]] if rows else t[:, cols[0]:cols[1]] if cols else t


EXPERT_ROWS = [
    Rule("decoder.layers.{j}.mlp.router.weight", ("model.layers.{i}.mlp.gate.weight",), REPLICATED),
    Rule("decoder.layers.{j}.mlp.experts.local_experts.{e}.linear_fc1.weight",
         ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
         FUSED_GATE_UP),
    Rule("decoder.layers.{j}.mlp.experts.local_experts.{e}.linear_fc2.weight",
         ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",), ROW_PARALLEL),
]


def test_expert_rows_expand_over_ep_ranks_and_roundtrip(tmp_path):
    """4 experts (F 6) in 4 layers at TP 2 x PP 2 x EP 2: one row per expert tensor, expanded by the stage
    iteration; local expert k of EP rank r is global expert 2r + k; merging every rank's shards gives back each
    HF tensor exactly once."""
    E, tp, pp, ep = 4, 2, 2, 2
    hf = {}
    for i in range(4):
        hf[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(E, 8)
        for e in range(E):
            for proj, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6))):
                hf[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] = torch.randn(shape)
    read = _reader(tmp_path, hf)
    layout = _layout(tp, pp)
    back = {}
    for p in range(pp):
        for r in range(ep):
            items = list(stage_items(EXPERT_ROWS, layout, p, experts=E, ep=ep, ep_rank=r))
            want = []  # expert by expert, as megatron-core's SequentialMLP lists its parameters
            for j in range(2):
                mg, h = f"decoder.layers.{j}.mlp", f"model.layers.{2 * p + j}.mlp"
                want.append((f"{mg}.router.weight", [f"{h}.gate.weight"]))
                for k in range(2):
                    x = f"{h}.experts.{2 * r + k}"
                    want += [(f"{mg}.experts.local_experts.{k}.linear_fc1.weight",
                              [f"{x}.gate_proj.weight", f"{x}.up_proj.weight"]),
                             (f"{mg}.experts.local_experts.{k}.linear_fc2.weight", [f"{x}.down_proj.weight"])]
            assert [(mg, names) for _, mg, names in items] == want
            for rule, _, names in items:
                shards = [rule.kind.shard(names, read, FACTS, layout, t) for t in range(tp)]
                for name, t in rule.kind.merge(names, shards, FACTS, 10).items():
                    if name in back:  # the router is replicated over the EP ranks
                        assert ".mlp.gate." in name and torch.equal(back[name], t)
                    back[name] = t
    assert sorted(back) == sorted(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_rank_dir_names_with_ep_and_layout_of(tmp_path):
    assert [rank_dir_name(1, 2, 1), rank_dir_name(1, 2, 4), rank_dir_name(1, 0, 1, 3, 4),
            rank_dir_name(1, 2, 4, 3, 4)] == ["mp_rank_01", "mp_rank_01_002", "mp_rank_01_003", "mp_rank_01_002_003"]
    for tp, pp, ep in ((2, 1, 1), (2, 3, 1), (2, 1, 4), (1, 2, 2)):
        it = tmp_path / f"{tp}{pp}{ep}"
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    rank_file(it, 1, t, p, pp, e, ep).parent.mkdir(parents=True)
        # a lone 3-digit part is PP unless the caller knows the checkpoint is expert parallel
        assert layout_of(it / "iter_0000001", expert_parallel=ep > 1) == (tp, pp, ep)
    assert layout_of(tmp_path / "214" / "iter_0000001") == (2, 4, 1)


def test_registry_records_match_their_tiny_models():
    """Each record's tiny config gives a config.json with the record's architecture and traits; its table covers
    the HF linears LoRA can target."""
    for fam in FAMILIES:
        cfg = tiny_config(fam.tiny.name).to_dict()
        cfg["architectures"] = [fam.architectures[0]]
        facts = facts_from_config(cfg)
        assert facts.family is fam and ARCHITECTURES[facts.architecture] is fam
        assert (facts.qkv_bias, facts.qk_norm) == (fam.qkv_bias, fam.qk_norm)
        linears = {h.split(".")[-2] for r in fam.table if r.scope == LAYER and r.kind.lora for h in r.hf}
        # GLM's HF MLP holds gate and up in one gate_up_proj; Mixtral's experts are w1 / w2 / w3
        gate_up = {"gate_up_proj"} if "gate_up_proj" in linears else {"gate_proj", "up_proj"}
        moe = {"w1", "w2", "w3"} if fam.architectures[0] == "MixtralForCausalLM" else set()
        assert linears == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"} | gate_up | moe
    assert hf_linear_owners()["gate_proj"] == "linear_fc1" and hf_linear_owners()["o_proj"] == "linear_proj"
    llama = dict(tiny_config("llama").to_dict(), architectures=["LlamaForCausalLM"], attention_bias=True)
    assert facts_from_config(llama).qkv_bias  # Llama's attention_bias key


_TRAITS_SCRIPT = """
import dataclasses, json, sys
import torch.distributed as dist
from megatron.core import parallel_state as ps, tensor_parallel
from ascendfactory import families
from ascendfactory.engine import device
from ascendfactory.engine.model import build_gpt_model, transformer_config
from ascendfactory.modelinfo import read_model_facts

device.setup("cpu")
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], world_size=1, rank=0)
ps.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(0)
facts = read_model_facts(sys.argv[1])
# a record with GLM's rope traits (what a GLM family adds), under a name of its own
families.ARCHITECTURES["HalfRopeForCausalLM"] = dataclasses.replace(
    facts.family, architectures=("HalfRopeForCausalLM",), rope_percent=0.5, rope_interleaved=True)
out = {}
for f in (facts, dataclasses.replace(facts, architecture="HalfRopeForCausalLM")):
    cfg = transformer_config(f)
    model = build_gpt_model(f, cfg)
    out[f.architecture] = [cfg.normalization, cfg.rotary_interleaved, model.rotary_pos_emb.inv_freq.numel()]
print(json.dumps(out))
"""


@pytest.mark.slow  # builds megatron-core models in a subprocess
def test_traits_reach_megatron_core(tiny_models):
    """rope fraction and interleave come from the record: a half-rope record rotates half of each head dim."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", _TRAITS_SCRIPT, str(tiny_models["qwen2"]), str(port)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    head_dim = read_model_facts(tiny_models["qwen2"]).head_dim
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "Qwen2ForCausalLM": ["RMSNorm", False, head_dim // 2],
        "HalfRopeForCausalLM": ["RMSNorm", True, head_dim // 4],
    }
