"""finetuning_type lora under torchrun (gloo, CPU): adapters train and nothing else, every layout trains the same
adapters, the export folds them into HF weights that reproduce the trained model, resume is exact, and a
checkpoint crosses between full and LoRA runs only where that is sound."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import _engine as E
import pytest
import torch

from ascendfactory.ckpt import files as L

pytestmark = pytest.mark.slow

LORA = dict(finetuning_type="lora", lora_r=4, lora_alpha=8, lr=1e-2, pack=True, train_iters=6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from ascendfactory.convert.api import hf_to_megatron

    root = tmp_path_factory.mktemp("engine_lora")
    model = E.make_model(root, tie_word_embeddings=True)  # tied: the frozen embedding is shared over PP stages
    conv = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        conv[(tp, pp)] = root / f"converted_TP{tp}PP{pp}"
        hf_to_megatron(str(model), str(conv[(tp, pp)]), tp, pp, None, None, None)
    return {"root": root, "model": model, "data": (root / "packed", E.write_sft(root / "packed", model, pack_len=64)),
            "conv": conv}


def _run(env, name: str, nproc: int, **kw):
    out = env["root"] / name
    cfg = E.write_config(out, env["model"], env["data"][0], **{**LORA, **kw})
    res = E.run_engine(cfg, nproc)
    return out, res


def _ok(res):
    assert res.returncode == 0, E.describe(res)


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_adapters_alone_train_alike_in_every_layout_and_export_reproduces_them(env, tmp_path):
    from safetensors.torch import load_file

    from ascendfactory.convert.mg2hf import megatron_to_hf
    from ascendfactory.convert.verify import verify_conversion

    runs = {}
    for tp, pp, cp, extra in [(1, 1, 1, dict(use_distributed_optimizer=True)), (2, 1, 1, dict(sequence_parallel=True)),
                              (1, 2, 1, {}), (1, 1, 2, {})]:
        out, res = _run(env, f"lora_TP{tp}PP{pp}CP{cp}", 2, ckpt_load_type=1,
                        user_converted_ckpt_path=str(env["conv"][(tp, pp)]), tensor_model_parallel_size=tp,
                        pipeline_model_parallel_size=pp, context_parallel_size=cp, **extra)
        _ok(res)
        assert re.search(r"LoRA r 4, alpha 8 on linear_qkv, linear_proj, linear_fc1, linear_fc2: [\d,]+ trainable "
                         r"parameters of [\d,]+ \([\d.]+%\)", res.stdout), res.stdout
        runs[(tp, pp) if cp == 1 else "cp2"] = out
    ref = E.losses(runs[(1, 1)])
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and ref[6] < ref[1] - 0.1
    for layout, out in runs.items():
        got = E.losses(out)
        for it in ref:
            assert got[it] == pytest.approx(ref[it], rel=1e-5), (layout, it)

    # The base weights are saved untouched beside the adapters; args say how to fold them.
    for layout, out in runs.items():
        tp, pp = (1, 1) if layout == "cp2" else layout
        for t in range(tp):
            for p in range(pp):
                base = _weights(L.rank_file(env["conv"][(tp, pp)], 1, t, p, pp))
                saved_file = L.rank_file(out / "saved_checkpoints", 6, t, p, pp)
                saved = _weights(saved_file)
                adapters = sorted(k for k in saved if ".lora_" in k)
                assert len(adapters) == 2 * 4 * (4 // pp), adapters
                for k, v in base.items():
                    assert torch.equal(saved[k], v), k
                args = torch.load(saved_file, map_location="cpu", weights_only=False)["args"]
                assert (args["finetuning_type"], args["lora_r"], args["lora_alpha"]) == ("lora", 4, 8.0)
    tp2 = _weights(L.rank_file(runs[(2, 1)] / "saved_checkpoints", 6, 1, 0, 1))
    assert tp2["decoder.layers.0.self_attention.linear_qkv.lora_A.weight"].shape == (4, 64)  # A whole
    assert tp2["decoder.layers.0.self_attention.linear_qkv.lora_B.weight"].shape == (64, 4)  # B's rows split
    assert tp2["decoder.layers.0.mlp.linear_fc2.lora_A.weight"].shape == (4, 64)  # A's columns split (128 / 2)
    assert tp2["decoder.layers.0.mlp.linear_fc2.lora_B.weight"].shape == (64, 4)

    # Dropout on the adapters' input: in the whole-input case (column linear, no SP) both TP ranks draw the same
    # mask, so the replicated A stays one matrix; it changes the training (iteration 1 is the base model either way,
    # and Adam's first step is lr x sign(gradient), which the masks rarely flip).
    drop, res = _run(env, "lora_TP2_dropout", 2, ckpt_load_type=1, user_converted_ckpt_path=str(env["conv"][(2, 1)]),
                     tensor_model_parallel_size=2, lora_dropout=0.3, train_iters=3)
    _ok(res)
    ranks = [_weights(L.rank_file(drop / "saved_checkpoints", 3, t, 0, 1)) for t in (0, 1)]
    for k in ranks[0]:
        if k.endswith(("linear_qkv.lora_A.weight", "linear_fc1.lora_A.weight")):
            assert torch.equal(ranks[0][k], ranks[1][k]), k
    got = E.losses(drop)
    assert got[1] == pytest.approx(ref[1], rel=1e-5) and abs(got[3] - ref[3]) > 1e-4 * ref[3]

    # Export: merged weights; the HF model reproduces the megatron model running its adapters (verify builds it
    # with the adapters beside the frozen weights), and every layout exports the same model (so the TP / PP
    # shards fold like the whole matrices).
    exported = {}
    for layout, out in runs.items():
        hf = tmp_path / f"hf_{layout if layout == 'cp2' else ''.join(map(str, layout))}"
        megatron_to_hf(out / "saved_checkpoints", hf, env["model"])
        exported[layout] = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert verify_conversion(tmp_path / "hf_11", runs[(1, 1)] / "saved_checkpoints") < 1e-4
    original = {k: v for f in sorted(env["model"].glob("*.safetensors")) for k, v in load_file(f).items()}
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (exported[(1, 1)][q] - original[q]).abs().max() > 1e-3  # the adapters are in
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.equal(exported[(1, 1)][norm], original[norm])  # frozen
    for layout, weights in exported.items():
        assert sorted(weights) == sorted(exported[(1, 1)])
        for k, v in weights.items():
            torch.testing.assert_close(v, exported[(1, 1)][k], rtol=0, atol=1e-5, msg=(layout, k))

    # Last, as peft may be absent (which skips only this): the adapters alone in PEFT's format (the fused q/k/v and
    # gate/up adapters split per HF linear); peft puts them on the original HF model, which then computes what the
    # merged export computes.
    PeftModel = pytest.importorskip("peft").PeftModel  # install.sh installs it; a site without it skips this part
    from transformers import AutoModelForCausalLM

    from ascendfactory.convert.peft_adapter import export_peft_adapter

    export_peft_adapter(runs[(2, 1)] / "saved_checkpoints", tmp_path / "peft", env["model"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        4, 8.0, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32), tmp_path / "peft")(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_21", dtype=torch.float32)(tokens).logits
    assert (with_adapter - merged).abs().max() < 1e-5


def test_resume_is_exact_and_full_runs_take_lora_checkpoints_only_as_merged_weights(env):
    conv = str(env["conv"][(1, 1)])
    # with dropout: the resume must also restore the generators that draw its masks
    first, res = _run(env, "lora_resume_src", 1, ckpt_load_type=1, user_converted_ckpt_path=conv, save_interval=3,
                      lora_dropout=0.1)
    _ok(res)
    cut = env["root"] / "lora_resume_cut"  # the run as it was at iteration 3
    (cut / "saved_checkpoints").mkdir(parents=True)
    shutil.copytree(first / "saved_checkpoints" / "iter_0000003", cut / "saved_checkpoints" / "iter_0000003")
    L.write_tracker(cut / "saved_checkpoints", 3)

    again, res = _run(env, "lora_resume", 1, ckpt_load_type=2, user_converted_ckpt_path=str(cut / "saved_checkpoints"),
                      lora_dropout=0.1)
    _ok(res)
    assert "starting at iteration 3" in res.stdout
    ref, got = E.losses(first), E.losses(again)
    assert sorted(got) == [4, 5, 6]
    for it in got:
        assert got[it] == pytest.approx(ref[it], rel=1e-6)
    a, b = E.final_weights(first), E.final_weights(again)
    assert any(".lora_B." in k for k in a) and sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # A checkpoint without adapters has no PEFT export: refused before any work.
    res = subprocess.run([sys.executable, "-m", "ascendfactory", "convert", "mg2hf", "--mg-dir", conv, "--hf-dir",
                          str(env["root"] / "no_hf"), "--hf-config-dir", str(env["model"]), "--peft-dir",
                          str(env["root"] / "no_peft")], capture_output=True, text=True)
    assert res.returncode == 2 and "holds no LoRA adapters" in res.stderr, res.stderr
    assert not (env["root"] / "no_hf").exists() and not (env["root"] / "no_peft").exists()

    # A full fine-tuning resume from it is refused: its optimizer state is the adapters'.
    bad, res = _run(env, "full_from_lora_resume", 1, finetuning_type="full", ckpt_load_type=2,
                    user_converted_ckpt_path=str(first / "saved_checkpoints"))
    assert res.returncode != 0
    assert ("the checkpoint was trained with LoRA (lora_r 4 on linear_fc1, linear_fc2, linear_proj, linear_qkv), "
            "this run uses full fine-tuning") in res.stderr, E.describe(res)
    assert not (bad / "saved_checkpoints" / L.TRACKER).exists()

    # Weights only: the adapters are folded in, so the full run starts from the LoRA run's model.
    full, res = _run(env, "full_from_lora_weights", 1, finetuning_type="full", ckpt_load_type=1,
                     user_converted_ckpt_path=str(first / "saved_checkpoints"), train_iters=2, lr=1e-6, min_lr=0.0)
    _ok(res)
    lora_run = E.losses(first)
    assert E.losses(full)[1] < lora_run[1] - 0.1
    # The same LoRA settings continue its adapters, other settings get them folded and train new ones from zero:
    # either way the run starts from the LoRA run's model.
    same, res = _run(env, "lora4_from_lora4", 1, ckpt_load_type=1,
                     user_converted_ckpt_path=str(first / "saved_checkpoints"), train_iters=2)
    _ok(res)
    assert E.losses(same)[1] == pytest.approx(E.losses(full)[1], rel=1e-5)
    other, res = _run(env, "lora8_from_lora4", 1, lora_r=8, ckpt_load_type=1,
                      user_converted_ckpt_path=str(first / "saved_checkpoints"), train_iters=2)
    _ok(res)
    assert E.losses(other)[1] == pytest.approx(E.losses(full)[1], rel=1e-6)
    assert _weights(L.rank_file(other / "saved_checkpoints", 2, 0, 0, 1))[
        "decoder.layers.0.mlp.linear_fc1.lora_A.weight"].shape == (8, 64)
