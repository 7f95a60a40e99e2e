"""Grouped GEMM for the MoE experts (moe_grouped_gemm): megatron-core's GroupedMLP keeps a rank's experts in two
tensors (weight1 / weight2), our checkpoints one tensor per expert under SequentialMLP's names. The mapping between
the two is exact both ways; GroupedMLP built on the CPU (the device adapter's reference grouped matmul) computes
what SequentialMLP computes with the mapped weights; an EP2 SFT with moe_grouped_gemm true trains with the losses of
false, saves per-expert legacy checkpoints mg2hf reads, resumes exactly, loads torch_dist weights written by
SequentialMLP, and refuses a full resume across the two implementations (its optimizer state follows the
parameters)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import _engine as E
import pytest
import torch
import yaml

from ascendfactory.ckpt import files as L
from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf
from ascendfactory.engine.moe import fuse_experts, split_experts

EXPERTS, HIDDEN, FFN = 3, 8, 5  # FFN: one TP rank's share of moe_intermediate_size


def test_mapping_round_trip_is_exact_and_follows_grouped_mlp_views():
    """Per-expert -> weight1 / weight2 -> per-expert gives the same tensors (bf16, bit for bit); weight1 / weight2
    are what GroupedMLP.forward reads: weight1.view(E, H, -1)[e] = expert e's linear_fc1 transposed (GLU columns
    [gate; up]), weight2.view(E, -1, H)[e] = its linear_fc2 transposed."""
    gen = torch.Generator().manual_seed(0)
    fc1 = [torch.randn(2 * FFN, HIDDEN, generator=gen).bfloat16() for _ in range(EXPERTS)]
    fc2 = [torch.randn(HIDDEN, FFN, generator=gen).bfloat16() for _ in range(EXPERTS)]
    w1, w2 = fuse_experts(fc1, fc2)
    assert (w1.shape, w2.shape) == ((HIDDEN, EXPERTS * 2 * FFN), (EXPERTS * FFN, HIDDEN))
    for e in range(EXPERTS):
        assert torch.equal(w1.view(EXPERTS, HIDDEN, -1)[e], fc1[e].t())
        assert torch.equal(w2.view(EXPERTS, -1, HIDDEN)[e], fc2[e].t())
    back1, back2 = split_experts(w1, w2, EXPERTS)
    for a, b in zip(back1 + back2, fc1 + fc2, strict=True):
        assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b)
        assert a.untyped_storage().nbytes() == b.numel() * b.element_size()  # torch.save writes only this tensor


_LAYER_SCRIPT = """
import io, json, sys, tempfile
import torch, torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
from ascendfactory.engine import device, moe
from ascendfactory.engine.dist_checkpoint import _sharded_state
from ascendfactory.engine.model import build_gpt_model, transformer_config
from ascendfactory.modelinfo import read_model_facts

device.setup("cpu")
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], world_size=1, rank=0)
ps.initialize_model_parallel(1, 1)
tensor_parallel.model_parallel_cuda_manual_seed(0)
facts = read_model_facts(sys.argv[1])
build = lambda precision, grouped: build_gpt_model(
    facts, transformer_config(facts, precision=precision, moe_grouped_gemm=grouped))
seq, grouped, seq32 = build("bf16", False), build("bf16", True), build("fp32", False)
weights = seq.state_dict()
out = {"fused": sorted(moe.grouped_experts(grouped).items())}
grouped.load_state_dict(moe.experts_as_model(weights, grouped))
seq32.load_state_dict({k: v.float() if torch.is_tensor(v) else v for k, v in weights.items()})

def saved(sd):
    f = io.BytesIO()
    torch.save(sd, f)
    return f.getvalue()

out["same_file"] = saved(moe.experts_as_saved(grouped.state_dict(), grouped)) == saved(weights)
torch.manual_seed(0)
tokens = torch.randint(0, facts.vocab_size, (2, 24))
positions = torch.arange(24).expand(2, 24)
logits = {}
for name, model in (("seq", seq), ("grouped", grouped), ("seq32", seq32)):
    logits[name] = model(tokens, positions, None).float()
    logits[name].square().mean().backward()
out["grouped_vs_seq"] = (logits["grouped"] - logits["seq"]).abs().max().item()
out["seq_vs_fp32"] = (logits["seq"] - logits["seq32"]).abs().max().item()
grads = {name: {k: p.grad for k, p in model.named_parameters() if ".mlp.experts." in k}
         for name, model in (("seq", seq), ("seq32", seq32))}
grads["grouped"] = {}
for prefix, n in moe.grouped_experts(grouped).items():
    experts = grouped.get_submodule(prefix[:-1])
    for i, (g1, g2) in enumerate(zip(*moe.split_experts(experts.weight1.grad, experts.weight2.grad, n))):
        grads["grouped"].update({f"{prefix}local_experts.{i}.linear_fc1.weight": g1,
                                 f"{prefix}local_experts.{i}.linear_fc2.weight": g2})
out["grad_keys_equal"] = grads["grouped"].keys() == grads["seq"].keys()
out["grad_grouped_vs_seq"] = max((grads["grouped"][k].float() - grads["seq"][k].float()).abs().max().item()
                                 for k in grads["seq"])
out["grad_seq_vs_fp32"] = max((grads["seq"][k].float() - grads["seq32"][k]).abs().max().item() for k in grads["seq"])

# torch_dist: SequentialMLP's shards load into GroupedMLP and back (megatron-core's own mapping), bit for bit
ckpt = tempfile.mkdtemp()
dist_checkpointing.save(_sharded_state(seq, None, None, loading=False), ckpt)
fresh = build("bf16", True)
fresh.load_state_dict(dist_checkpointing.load(_sharded_state(fresh, None, None, loading=True), ckpt)["model"])
out["dist_into_grouped"] = all(torch.equal(fresh.state_dict()[k], v) for k, v in grouped.state_dict().items()
                               if torch.is_tensor(v))
print(json.dumps(out))
"""


@pytest.mark.slow  # builds megatron-core models in a subprocess
def test_grouped_mlp_on_cpu_computes_what_sequential_mlp_computes(tmp_path):
    """The tiny Qwen3-MoE in bf16, built with SequentialMLP and with GroupedMLP (the CPU reference grouped matmul)
    holding the mapped weights: the legacy file of the GroupedMLP model is SequentialMLP's byte for byte; logits and
    expert gradients agree within bf16 rounding. The bound is measured, not guessed: GroupedMLP fuses the activation
    with the routing weight (one bf16 rounding where SequentialMLP's MLP rounds twice), so each is about as far from
    the same model in fp32 as the other, and they differ by at most twice SequentialMLP's own bf16 error; a wrong
    mapping differs by the size of the logits. A torch_dist checkpoint of the SequentialMLP model loads into a GroupedMLP one exactly."""
    model = E.make_model(tmp_path, "qwen3_moe", seed=3, mlp_only_layers=[1])
    r = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT, str(model), str(E.free_port())], capture_output=True,
                       text=True, timeout=300, env=E.engine_env())
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert [p for p, _ in out["fused"]] == [f"decoder.layers.{i}.mlp.experts." for i in (0, 2, 3)]  # 1: dense
    assert all(n == 4 for _, n in out["fused"])
    assert out["same_file"] and out["grad_keys_equal"] and out["dist_into_grouped"], out
    # two bf16 computations of the same function, each about as far from fp32 as SequentialMLP is
    assert out["grouped_vs_seq"] <= 2 * out["seq_vs_fp32"], out
    assert out["grad_grouped_vs_seq"] <= 2 * out["grad_seq_vs_fp32"], out


# ---------------------------------------------------------------- the engine (torchrun, gloo, EP2)

# Losses of the two implementations over 6 iterations: the forward differs by bf16 rounding (above), and the
# updates of a few steps carry that along (measured: 1.4e-4 relative at most). 1e-3 is a quarter of bf16's relative
# precision (2^-8), far below what a wrong mapping or routing changes (the loss falls from ~6.1 by whole units).
LOSS_REL = 1e-3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_grouped")
    model = E.make_model(root, "qwen3_moe", seed=3, mlp_only_layers=[1])
    conv = root / "converted_EP2"
    hf_to_megatron(model, conv, 1, 1, ep=2)
    return {"root": root, "model": model, "sft": E.write_sft(root / "sft", model) and root / "sft", "conv": conv,
            "runs": {}}


def _run(env, tag: str, grouped: bool, **kw):
    """SFT at EP2 in bf16 from the converted weights (6 iterations, checkpoints at 3 and 6), shared by tag."""
    if tag not in env["runs"]:
        out = env["root"] / f"run_{tag}"
        cfg = E.write_config(out, env["model"], env["sft"], **{
            "ckpt_load_type": 1, "user_converted_ckpt_path": str(env["conv"]), "expert_model_parallel_size": 2,
            "use_distributed_optimizer": True, "micro_batch_size": 1, "save_interval": 3, "precision": "bf16",
            "moe_grouped_gemm": grouped, **kw})
        res = E.run_engine(cfg, 2, timeout=600)
        assert res.returncode == 0, E.describe(res)
        env["runs"][tag] = (out, cfg, res)
    return env["runs"][tag]


def _again(env, out, cfg, tmp_path, **kw):
    """A copy of a run's output without its last checkpoint, auto-resumed (kw: other settings)."""
    again = tmp_path / "again"
    return again, E.resume_copy(out, cfg, env["model"], env["sft"], again, 2, 6, 3, **kw)


def _error_line(res) -> str:
    errors = {ln for ln in res.stderr.splitlines() if ln.startswith("error:")}
    # every rank refuses with the same line (the bare torchrun here adds its own report; the CLI's agent does not)
    assert res.returncode != 0 and len(errors) == 1, E.describe(res)
    assert "exitcode  : 2" in res.stderr, E.describe(res)
    return errors.pop()


@pytest.mark.slow
def test_grouped_gemm_trains_like_sequential_and_saves_per_expert_checkpoints(env, tmp_path):
    """EP2 (2 of the 4 experts a rank): moe_grouped_gemm true (GroupedMLP, logged) and false (SequentialMLP,
    torch_dist) from the same converted weights give the same losses (LOSS_REL); the grouped run's legacy
    checkpoint holds one tensor per expert under SequentialMLP's names, which mg2hf turns into the hub's experts."""
    g_out, _, g_res = _run(env, "grouped", True)
    s_out, _, s_res = _run(env, "sequential", False, ckpt_format="torch_dist")
    assert "experts: GroupedMLP (moe_grouped_gemm: true, grouped matmul: reference)" in g_res.stdout
    assert "experts: SequentialMLP (moe_grouped_gemm: false)" in s_res.stdout
    g, s = E.losses(g_out), E.losses(s_out)
    assert sorted(g) == sorted(s) == [1, 2, 3, 4, 5, 6] and g[6] < g[1] - 0.1, (g, s)
    for it in g:
        assert g[it] == pytest.approx(s[it], rel=LOSS_REL), (it, g, s)

    rank = g_out / "saved_checkpoints" / "iter_0000006" / "mp_rank_00_001"
    content = torch.load(rank / L.MODEL_FILE, map_location="cpu", weights_only=False)
    names = [k for k in content["model"] if ".mlp.experts." in k and k.startswith("decoder.layers.0.")]
    assert names == [f"decoder.layers.0.mlp.experts.local_experts.{i}.{lin}.{part}" for i in (0, 1)
                     for lin in ("linear_fc1", "linear_fc2") for part in ("weight", "_extra_state")]
    assert content["args"]["moe_grouped_gemm"] is True
    hf = tmp_path / "hf"
    megatron_to_hf(g_out / "saved_checkpoints", hf, env["model"])
    from safetensors.torch import load_file

    exported = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    # EP rank 1's local expert 1 is global expert 3; gate rows first in linear_fc1
    fc1 = content["model"]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    gate = exported["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert torch.equal(gate, fc1[: gate.shape[0]].to(gate.dtype))
    assert not torch.equal(gate, hf_gate(env["model"]))  # trained, not the original


def hf_gate(model_dir):
    from safetensors.torch import load_file

    return next(v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()
                if k == "model.layers.0.mlp.experts.3.gate_proj.weight")


@pytest.mark.slow
def test_grouped_run_resumes_exactly(env, tmp_path):
    """Auto-resume of the grouped run from iteration 3 (weight1 / weight2 from the per-expert file, their
    distributed-optimizer shards, RNG, data position) repeats iterations 4-6 bit for bit."""
    out, cfg, _ = _run(env, "grouped", True)
    again, res = _again(env, out, cfg, tmp_path)
    assert res.returncode == 0, E.describe(res)
    assert "resumed" in res.stdout
    full, resumed = E.losses(out), E.losses(again)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[i] == full[i] for i in (4, 5, 6)), (resumed, full)
    a, b = E.final_weights(out), E.final_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_full_resume_across_implementations_refused_weights_load(env, tmp_path):
    """A full resume of the grouped run's legacy checkpoint as SequentialMLP is refused in one line naming both
    settings (the optimizer state follows the parameters), as is the torch_dist SequentialMLP run's as GroupedMLP;
    weights alone (ckpt_load_type 1) of the torch_dist SequentialMLP checkpoint load into GroupedMLP: the first
    loss, a forward of the loaded weights, is SequentialMLP's own from them within bf16 rounding."""
    out, cfg, _ = _run(env, "grouped", True)
    # Relaunched with train_auto_resume, `plan` finds the same refusal in the manifest, before any stage.
    saved = out / "saved_checkpoints" / L.iter_dir_name(L.read_tracker(out / "saved_checkpoints"))
    assert json.loads((saved / L.MANIFEST).read_text())["moe_grouped_gemm"] is True
    assert E.plan_error(cfg, 2) is None
    assert E.plan_error(cfg, 2, moe_grouped_gemm="auto") == (
        f"train_auto_resume: {saved}: its experts trained as GroupedMLP (moe_grouped_gemm: true), this run builds "
        "SequentialMLP (moe_grouped_gemm: false), and the optimizer state follows the experts' parameters; set "
        "moe_grouped_gemm: true to resume, or ckpt_load_type 1 to load its weights with a fresh optimizer")
    # Given as the checkpoint to resume from: `train` reads its args before any stage.
    given = tmp_path / "given"
    assert E.plan_error(cfg, 2, "train", moe_grouped_gemm="auto", ckpt_load_type=2, train_auto_resume=False,
                        user_converted_ckpt_path=str(saved.parent), output_dir=str(given)).startswith(
        f"user_converted_ckpt_path {saved.parent}: its experts trained as GroupedMLP (moe_grouped_gemm: true), "
        "this run builds SequentialMLP")
    assert not (given / "saved_checkpoints").exists() and not (given / "logs" / "torchrun").exists()
    line = _error_line(_again(env, out, cfg, tmp_path / "a", moe_grouped_gemm=False)[1])
    assert ("its experts trained as GroupedMLP (moe_grouped_gemm: true), this run builds SequentialMLP "
            "(moe_grouped_gemm: false)") in line and "set moe_grouped_gemm: true to resume" in line, line
    s_out, s_cfg, _ = _run(env, "sequential", False, ckpt_format="torch_dist")
    line = _error_line(_again(env, s_out, s_cfg, tmp_path / "b", moe_grouped_gemm=True)[1])
    assert "its experts trained as SequentialMLP (moe_grouped_gemm: false), this run builds GroupedMLP" in line, line

    first = {}
    for grouped in (True, False):
        out = tmp_path / f"weights_{grouped}"
        cfg = E.write_config(out, env["model"], env["sft"], **{
            **yaml.safe_load(s_cfg.read_text()), "output_dir": str(out), "moe_grouped_gemm": grouped,
            "user_converted_ckpt_path": str(s_out / "saved_checkpoints"), "train_iters": 2})
        res = E.run_engine(cfg, 2, timeout=600)
        assert res.returncode == 0 and "weights only" in res.stdout, E.describe(res)
        first[grouped] = E.losses(out)[1]
    assert first[True] == pytest.approx(first[False], rel=LOSS_REL), first
    assert abs(first[True] - E.losses(s_out)[1]) > 0.1  # the trained weights, not the converted ones


@pytest.mark.slow
def test_full_reshard_of_a_grouped_checkpoint(env, tmp_path):
    """convert reshard with optimizer state (engine runs that build GroupedMLP, as the checkpoint records) of the
    grouped run's EP2 checkpoint into EP1: each expert's tensors land under its global index bit for bit, the rest
    as it was, and the result still records GroupedMLP (its optimizer state is GroupedMLP's)."""
    from ascendfactory.engine.reshard import reshard_full

    out, _, _ = _run(env, "grouped", True)
    reshard_full(out / "saved_checkpoints", tmp_path / "ep1", 1, 1, 1, "legacy")
    content = torch.load(tmp_path / "ep1" / "iter_0000006" / "mp_rank_00" / L.MODEL_FILE, map_location="cpu",
                         weights_only=False)
    assert content["args"]["moe_grouped_gemm"] is True and content["optimizer"]
    ep1 = {k: v for k, v in content["model"].items() if torch.is_tensor(v)}
    ep2 = E.final_weights(out)  # "mp_rank_00_00{r}/<name>" -> tensor (as float)
    assert len(ep1) == len({k.split("/", 1)[1] for k in ep2 if "local_experts" not in k}) + 3 * 4 * 2
    for key, value in ep2.items():
        rank_dir, name = key.split("/", 1)
        if "local_experts." in name:  # EP rank r's local expert i is global expert 2r + i
            head, i, tail = re.match(r"(.*local_experts\.)(\d+)(\..*)", name).groups()
            name = f"{head}{int(rank_dir[-1]) * 2 + int(i)}{tail}"
        assert torch.equal(ep1[name].float(), value), key
