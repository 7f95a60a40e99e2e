"""Mixture-of-Experts training (SPEC.md section 8), phase 2: a tiny Qwen3-MoE (with a dense layer) trained by the
engine with expert parallel on gloo. The same losses at EP1, EP2, TP2 x EP2 and PP2 from the converted weights
(distributed optimizer: dense shards over DP, expert shards over expert DP), the load-balancing loss in the log
line, metrics.jsonl and TensorBoard, an exact resume at EP2, the EP2 export's logits equal to the trained
checkpoint's, and LoRA on the experts at EP2 whose PEFT export loads in peft."""

from __future__ import annotations

import _engine as E
import pytest
import torch
from test_convert_roundtrip import hf_tensors

from ascendfactory.ckpt import files as L
from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf
from ascendfactory.convert.verify import TOLERANCE, compare


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    model = E.make_model(root, "qwen3_moe", seed=3, mlp_only_layers=[1])
    conv = {}
    for tp, pp, ep in [(1, 1, 1), (1, 1, 2), (2, 1, 2), (1, 2, 1)]:
        conv[(tp, pp, ep)] = root / f"converted_TP{tp}PP{pp}EP{ep}"
        hf_to_megatron(model, conv[(tp, pp, ep)], tp, pp, ep=ep)
    return {"root": root, "model": model, "sft": E.write_sft(root / "sft", model) and root / "sft", "conv": conv,
            "runs": {}}


def _ok(res):
    assert res.returncode == 0, E.describe(res)


def _run(env, tp: int, pp: int, ep: int, nproc: int = 2, tag: str = "", **kw):
    """SFT from the converted weights at this layout (6 iterations, a checkpoint at 3 and 6); runs are shared
    (tag: a run with other settings kw)."""
    key = (tp, pp, ep, tag)
    if key not in env["runs"]:
        out = env["root"] / f"run_TP{tp}PP{pp}EP{ep}{tag}"
        cfg = E.write_config(out, env["model"], env["sft"], ckpt_load_type=1,
                             user_converted_ckpt_path=str(env["conv"][(tp, pp, ep)]), tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                             sequence_parallel=tp > 1, use_distributed_optimizer=True, micro_batch_size=1,
                             save_interval=3, **kw)
        _ok(res := E.run_engine(cfg, nproc, timeout=600))
        env["runs"][key] = (out, cfg, res)
    return env["runs"][key]


@pytest.mark.slow
def test_same_losses_ep1_ep2_tp2ep2_pp2_with_load_balancing_loss(env):
    """From the same HF weights, EP2 (each rank 2 of the 4 experts, allgather dispatcher), TP2 x EP2 (experts also
    TP-split), EP2 over 4 processes (expert DP 2: the experts' optimizer shards split over it), PP2, and the alltoall
    dispatcher at EP2 x expert DP2 (at TP > 1 it needs an uneven all-gather, which gloo lacks) train with EP1's
    losses (rel 1e-5); the loss falls; MoE runs log load_balancing_loss."""
    out, _, res = _run(env, 1, 1, 1)
    ref = E.losses(out)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and ref[6] < ref[1] - 0.1, ref
    rows = E.metrics(out)
    balance = [r["load_balancing_loss"] for r in rows]
    # a balanced router gives 1 (top-k x sum of fraction x probability x experts); a random init is near it
    assert all(0.5 < b < 4 for b in balance), balance
    assert "load_balancing_loss: " in res.stdout
    assert any((out / "logs" / "tensorboard").iterdir())
    a2a = {"moe_token_dispatcher_type": "alltoall"}  # the accelerators' dispatcher, run on gloo by the device adapter
    for tp, pp, ep, nproc, tag, kw in [(1, 1, 2, 2, "", {}), (2, 1, 2, 4, "", {}), (1, 1, 2, 4, "edp2", {}),
                                       (1, 2, 1, 2, "", {}), (1, 1, 2, 4, "a2a", a2a)]:
        other_out = _run(env, tp, pp, ep, nproc, tag, **kw)[0]
        other_losses = E.losses(other_out)
        assert sorted(other_losses) == sorted(ref)
        for it, loss in other_losses.items():
            assert loss == pytest.approx(ref[it], rel=1e-5), ((tp, pp, ep), it, loss, ref[it])
        assert [r["load_balancing_loss"] for r in E.metrics(other_out)] == pytest.approx(balance, rel=1e-4)
    # the EP2 runs saved EP-suffixed rank folders, one per EP rank, with their distributed optimizer shards
    for tag in ("", "edp2"):
        it = env["runs"][(1, 1, 2, tag)][0] / "saved_checkpoints" / "iter_0000006"
        assert sorted(p.name for p in it.glob("mp_rank_*")) == ["mp_rank_00_000", "mp_rank_00_001"]
        assert all((it / f"mp_rank_00_00{e}" / "distrib_optim.pt").is_file() for e in (0, 1))


@pytest.mark.slow
def test_resume_at_ep2_is_exact_and_export_equals_trained_model(env, tmp_path):
    """Auto-resume at EP2 x expert DP2 (4 processes) from iteration 3 (weights, dense optimizer shards over DP 4,
    expert ones over expert DP 2, RNG, data position) repeats iterations 4-6 exactly; mg2hf of the EP2 checkpoint
    loads in transformers with the trained model's logits."""
    out, cfg, _ = _run(env, 1, 1, 2, 4, "edp2")
    full = E.losses(out)
    again = tmp_path / "again"
    _ok(res := E.resume_copy(out, cfg, env["model"], env["sft"], again, 4, 6, 3))
    assert "resumed" in res.stdout
    resumed = E.losses(again)
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[i] == full[i] for i in (4, 5, 6)), (resumed, full)
    a, b = E.final_weights(out), E.final_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    hf = tmp_path / "hf"
    megatron_to_hf(out / "saved_checkpoints", hf, env["model"])
    trained = compare([{"hf_dir": str(hf), "mg_dir": str(out / "saved_checkpoints")},
                       {"hf_dir": str(env["model"]), "mg_dir": str(out / "saved_checkpoints")}], nproc=2)
    assert trained[0]["max_abs_diff"] <= TOLERANCE, trained
    assert trained[1]["max_abs_diff"] > 1e-3  # training moved the model away from the original


@pytest.mark.slow
def test_lora_on_experts_at_ep2_exports_peft_adapter(env, tmp_path):
    """LoRA on attention and on every expert's linear_fc1 / linear_fc2 at EP2: the PEFT export names each expert as
    the hub does (mlp.experts.{e}.gate_proj / up_proj / down_proj, global e), each adapter's delta is what the merged
    mg2hf export added to that expert's weight, and peft loads the adapter onto the original model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ascendfactory.convert.peft_adapter import export_peft_adapter

    out, _, res = _run(env, 1, 1, 2, tag="lora", finetuning_type="lora", lora_r=4, lora_alpha=8.0,
                       lora_target_modules=["linear_qkv", "linear_fc1", "linear_fc2"], lr=1e-2)
    assert "LoRA r 4" in res.stdout
    save = out / "saved_checkpoints"
    sd = torch.load(L.rank_file(save, 6, 0, 0, 1, 1, 2), weights_only=False)["model"]
    assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.lora_B.weight" in sd
    export_peft_adapter(save, tmp_path / "peft", env["model"])
    megatron_to_hf(save, tmp_path / "merged", env["model"])
    adapter = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    base, merged = hf_tensors(env["model"]), hf_tensors(tmp_path / "merged")
    experts = 0
    for layer in (0, 2, 3):  # layer 1 is dense (mlp_only_layers)
        for e in range(4):  # experts 2 and 3 come from EP rank 1's files
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                a, b = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
                delta = merged[f"{name}.weight"] - base[f"{name}.weight"]
                assert delta.abs().max() > 0 and torch.allclose(delta, 2.0 * b @ a, atol=1e-6), name
                experts += 1
    assert experts == 36
    # peft (0.21, transformers 5) loads the per-expert adapter onto the fused expert tensors; merged, it gives our
    # merged export's weights, except the dense layer's MLP: peft takes gate_proj / up_proj / down_proj for the
    # experts' names only and leaves that layer's adapters out
    hf = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    fused = "model.layers.2.mlp.experts.gate_up_proj"  # transformers 5 holds a layer's experts in one tensor
    before = hf.state_dict()[fused].clone()
    by_peft = PeftModel.from_pretrained(hf, tmp_path / "peft").merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    differ = {k for k in ours if not torch.allclose(by_peft[k], ours[k], atol=1e-6)}
    assert differ <= {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}, differ
    assert (by_peft[fused] - before).abs().max() > 1e-4


def _exp(tmp_path, model, **keys):
    from ascendfactory.config.schema import ExpConfig

    return ExpConfig(model_name_or_path=str(model), output_dir=str(tmp_path), dataset="d.jsonl", **keys)


def test_moe_keys_choose_dispatcher_grouped_gemm_and_aux_loss(tmp_path):
    """auto: the device adapter's choice (allgather and SequentialMLP on CPU / gloo, alltoall on nccl / hccl); the
    aux-loss weight defaults to config.json's router_aux_loss_coef; grouped GEMM true where GroupedMLP cannot run
    (CPU in fp32, the default there) is the user's error naming the keys, in bf16 GroupedMLP; a dense model gets no
    MoE entries."""
    from ascendfactory.engine.device import Device
    from ascendfactory.engine.model import transformer_config
    from ascendfactory.engine.moe import config_overrides
    from ascendfactory.errors import UserError
    from ascendfactory.modelinfo import read_model_facts
    from ascendfactory.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m", "qwen3_moe", with_tokenizer=False, router_aux_loss_coef=0.02)
    facts = read_model_facts(model)
    cpu = Device("cpu", "gloo")
    auto = config_overrides(_exp(tmp_path, model), facts, cpu)
    assert auto == {"moe_token_dispatcher_type": "allgather", "moe_grouped_gemm": False}
    tc = transformer_config(facts, **auto)
    assert (tc.moe_aux_loss_coeff, tc.moe_token_dispatcher_type, tc.moe_grouped_gemm) == (0.02, "allgather", False)
    assert config_overrides(_exp(tmp_path, model), facts, Device("cuda", "nccl"))["moe_token_dispatcher_type"] == (
        "alltoall")
    given = config_overrides(_exp(tmp_path, model, moe_aux_loss_coeff=0.5, moe_token_dispatcher_type="alltoall",
                                  tensor_model_parallel_size=1), facts, cpu)
    assert (given["moe_aux_loss_coeff"], given["moe_token_dispatcher_type"]) == (0.5, "alltoall")
    tp2_a2a = _exp(tmp_path, model, moe_token_dispatcher_type="alltoall", tensor_model_parallel_size=2)
    with pytest.raises(UserError, match="^moe_token_dispatcher_type: alltoall at tensor_model_parallel_size 2 .* gloo"):
        config_overrides(tp2_a2a, facts, cpu)
    assert config_overrides(tp2_a2a, facts, Device("cuda", "nccl"))["moe_token_dispatcher_type"] == "alltoall"
    with pytest.raises(UserError, match=r"moe_grouped_gemm: true needs precision: bf16 .* the run's is fp32 \(auto "
                                        r"on cpu\); set precision: bf16 or moe_grouped_gemm: false"):
        config_overrides(_exp(tmp_path, model, moe_grouped_gemm=True), facts, cpu)
    assert config_overrides(_exp(tmp_path, model, moe_grouped_gemm=True, precision="bf16"), facts, cpu)[
        "moe_grouped_gemm"] is True
    assert config_overrides(_exp(tmp_path, model, precision="bf16"), facts, cpu)["moe_grouped_gemm"] is False
    dense = make_tiny_model(tmp_path / "d", "qwen2", with_tokenizer=False)
    assert config_overrides(_exp(tmp_path, dense), read_model_facts(dense), cpu) == {}


def test_flops_per_token_counts_the_experts_a_token_meets(tmp_path):
    """MoE layers: router + top-k experts + shared expert, not all experts; dense layers (mlp_only_layers) as
    before."""
    from ascendfactory.engine.metrics import flops_per_token
    from ascendfactory.modelinfo import read_model_facts
    from ascendfactory.tiny import make_tiny_model

    f = read_model_facts(make_tiny_model(tmp_path / "m", "qwen2_moe", with_tokenizer=False, mlp_only_layers=[1]))
    h, d = f.hidden_size, f.head_dim
    attn = h * f.num_heads * d * 2 + h * f.num_kv_heads * d * 2
    moe = h * f.num_experts + 3 * h * (f.moe_topk * f.moe_ffn_hidden_size + f.shared_expert_size)
    weights = 4 * attn + 3 * h * f.ffn_hidden_size + 3 * moe + f.vocab_size * h  # layer 1 dense, 3 MoE layers
    assert f.moe_layers == (0, 2, 3) and f.shared_expert_size > 0
    assert flops_per_token(f, seq_len=32) == 6 * weights + 12 * 4 * 32 * f.num_heads * d
