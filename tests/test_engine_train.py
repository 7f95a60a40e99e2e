"""The engine under torchrun (gloo, CPU): pretrain and SFT, TP2 / PP2 / CP2 / DP2 with the distributed optimizer,
an uneven PP split, the three load modes, save_total_limit. Tiny Qwen2-shaped model, a few iterations each."""

from __future__ import annotations

import json
import math
import re
import shutil

import _engine as E
import pytest
import torch

from ascendfactory.ckpt import files as L

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_train")
    model = E.make_model(root)
    from ascendfactory.convert.api import hf_to_megatron

    conv = {}
    for tp, pp, layers in [(1, 1, None), (2, 1, None), (1, 2, None), (1, 2, "3,1")]:
        conv[(tp, pp, layers)] = root / f"converted_TP{tp}PP{pp}_{layers or 'even'}"
        hf_to_megatron(str(model), str(conv[(tp, pp, layers)]), tp, pp, layers, None, None)
    return {
        "root": root,
        "model": model,
        "sft": (root / "sft", E.write_sft(root / "sft", model)),
        "packed": (root / "packed", E.write_sft(root / "packed", model, pack_len=64)),
        "pt": (root / "pt", E.write_pretrain(root / "pt", model)),
        "conv": conv,
        "runs": {},
    }


def _vocab(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def _ok(res):
    assert res.returncode == 0, E.describe(res)


def test_pretrain_dp2_distributed_optimizer_bf16_loss_falls(env):
    out = env["root"] / "pt_dp2"
    cfg = E.write_config(out, env["model"], env["pt"][0], stage="pt", train_iters=12, use_distributed_optimizer=True,
                         precision="bf16",
                         reset_position_ids=True, reset_attention_mask=True, global_batch_size=8)
    stale = out / "data_cache"  # as left by a run killed while building the dataset index
    stale.mkdir()
    (stale / ".building").touch()
    (stale / "half-written-shuffle_index.npy").write_bytes(b"\x93NUMPY")
    _ok(res := E.run_engine(cfg, 2))
    assert "TP1 PP1 CP1 DP2, precision bf16" in res.stdout
    assert not (stale / ".building").exists() and not (stale / "half-written-shuffle_index.npy").exists()
    assert list(stale.rglob("*.npy"))
    losses = E.losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert abs(losses[1] - math.log(_vocab(env["model"]))) < 0.3
    assert losses[12] < losses[1] - 0.5
    files = {p.name for p in (out / "saved_checkpoints" / "iter_0000012" / "mp_rank_00").iterdir()}
    assert files == {"model_optim_rng.pt", "distrib_optim.pt"}
    row = E.metrics(out)[-1]
    assert set(row) == {"iteration", "consumed_samples", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops",
                        "iter_ms"}
    assert row["consumed_samples"] == 96 and row["tokens_per_sec"] > 0
    assert (out / "logs" / "train_rank_000.log").is_file() and (out / "logs" / "train_rank_001.log").is_file()
    line = next(x for x in res.stdout.splitlines() if "iteration       12/      12" in x)
    for part in ("consumed samples:", "learning rate:", "lm loss:", "grad norm:", "tokens/s/device:",
                 "TFLOP/s/device:", "elapsed time per iteration (ms):"):
        assert part in line


def test_fp16_dynamic_loss_scaling(env):
    """fp16 weights with megatron-core's dynamic loss scaler: the loss falls, the log shows the scale and the
    steps skipped on overflow, as Megatron's does."""
    out = env["root"] / "fp16"
    cfg = E.write_config(out, env["model"], env["packed"][0], pack=True, precision="fp16", train_iters=6)
    _ok(res := E.run_engine(cfg, 1))
    assert "precision fp16" in res.stdout
    lines = [x for x in res.stdout.splitlines() if "lm loss:" in x]
    assert len(lines) == 6 and all(re.search(r"loss scale: \d+\.\d \| grad norm: ", x) for x in lines), lines
    assert re.search(r"number of skipped iterations: +\d+ \|$", lines[-1])
    losses = E.losses(out)
    assert losses[6] < losses[1] - 0.5
    state = torch.load(out / "saved_checkpoints" / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt",
                       map_location="cpu", weights_only=False)
    assert state["model"]["decoder.layers.0.mlp.linear_fc1.weight"].dtype == torch.float16
    assert "grad_scaler" in state["optimizer"]  # resumes with its loss scale


def _packed_run(env, tp: int, pp: int, layers: str | None = None, cp: int = 1):
    """Packed SFT, 5 iterations from the HF weights converted to this layout; run once per module, as the
    same-loss tests share the TP1 PP1 reference."""
    conv = env["conv"][(tp, pp, layers)]
    if (tp, pp, layers, cp) not in env["runs"]:
        out = env["root"] / f"packed_TP{tp}PP{pp}CP{cp}_{layers or 'even'}"
        cfg = E.write_config(out, env["model"], env["packed"][0], pack=True, ckpt_load_type=1,
                             user_converted_ckpt_path=str(conv), tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, context_parallel_size=cp, sequence_parallel=tp > 1,
                             train_iters=5, num_layer_list=layers)
        _ok(res := E.run_engine(cfg, tp * pp * cp))
        assert f"from {conv}/iter_0000001" in res.stdout
        env["runs"][(tp, pp, layers, cp)] = (out, res)
    return env["runs"][(tp, pp, layers, cp)]


def _assert_same_losses(ref: dict, other: dict, what, rel: float = 1e-4) -> None:
    assert sorted(other) == sorted(ref)
    for it, loss in other.items():
        assert loss == pytest.approx(ref[it], rel=rel), (what, it, loss, ref[it])


def test_same_losses_tp1_tp2_pp2_from_converted_weights(env):
    """Packed SFT from the converted HF weights: TP2 (sequence parallel) and PP2 (1F1B) match TP1."""
    ref = E.losses(_packed_run(env, 1, 1)[0])
    assert sorted(ref) == [1, 2, 3, 4, 5] and ref[5] < ref[1]
    for tp, pp in [(2, 1), (1, 2)]:
        _assert_same_losses(ref, E.losses(_packed_run(env, tp, pp)[0]), (tp, pp))


def test_uneven_pipeline_split_trains_saves_exports_like_pp1(env, tmp_path):
    """num_layer_list 3,1 (HF layers 0-2 on stage 0, layer 3 on stage 1) from weights converted with that split:
    same losses as PP1; the saves record the split and export to the PP1 run's HF weights."""
    from safetensors.torch import load_file

    from ascendfactory.ckpt.reader import load_rank, read_checkpoint_layout
    from ascendfactory.convert.mg2hf import megatron_to_hf

    ref_out = _packed_run(env, 1, 1)[0]
    out, res = _packed_run(env, 1, 2, "3,1")
    assert "TP1 PP2 CP1 DP1" in res.stdout and "layers per pipeline stage 3,1" in res.stdout
    _assert_same_losses(E.losses(ref_out), E.losses(out), "PP2 3,1")
    saved = read_checkpoint_layout(out / "saved_checkpoints")
    assert (saved.pp, saved.layers, load_rank(saved.file(0, 0))["args"]["num_layer_list"]) == (2, (3, 1), [3, 1])

    exported = {}
    for name, run in (("pp1", ref_out), ("uneven", out)):
        megatron_to_hf(run / "saved_checkpoints", tmp_path / name, env["model"])
        exported[name] = {k: v for f in sorted((tmp_path / name).glob("*.safetensors"))
                          for k, v in load_file(f).items()}
    assert sorted(exported["uneven"]) == sorted(exported["pp1"])
    assert "model.layers.3.mlp.down_proj.weight" in exported["uneven"]
    for k, v in exported["pp1"].items():
        torch.testing.assert_close(exported["uneven"][k], v, rtol=0, atol=1e-4, msg=k)


def test_full_resume_of_another_layer_split_refused(env):
    """A full resume (ckpt_load_type 2: the optimizer state too) of a training checkpoint saved with the layers
    split 3,1 into a run splitting them 2,2 (same TP / PP) is refused naming both splits; a weights-only load is
    resharded by the convert stage instead (test_convert_reshard)."""
    saved = _packed_run(env, 1, 2, "3,1")[0] / "saved_checkpoints"
    out = env["root"] / "packed_PP2_2-2_on_3-1"
    cfg = E.write_config(out, env["model"], env["packed"][0], pack=True, ckpt_load_type=2,
                         user_converted_ckpt_path=str(saved), pipeline_model_parallel_size=2, num_layer_list="2,2")
    res = E.run_engine(cfg, 2)
    # The first worker to refuse exits 2 (user error; torchrun then stops the other and itself exits 1).
    assert res.returncode != 0 and re.search(r"exitcode\s*: 2 ", res.stderr), E.describe(res)
    it = L.read_tracker(saved)
    assert (f"error: num_layer_list: the run splits the layers 2,2 over its pipeline stages but "
            f"{saved}/{L.iter_dir_name(it)} holds 3,1") in res.stderr, E.describe(res)
    assert not (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").exists()

    # The run's own checkpoint, relaunched with train_auto_resume: its manifest records the split, so `plan`
    # refuses another one before any stage, with the engine's line; the same split passes.
    run_dir = saved.parent
    assert json.loads((saved / L.iter_dir_name(it) / L.MANIFEST).read_text())["num_layer_list"] == [3, 1]
    assert E.plan_error(run_dir / "exp-config.yaml", 2) is None
    assert E.plan_error(run_dir / "exp-config.yaml", 2, num_layer_list="2,2") == (
        f"train_auto_resume: num_layer_list: the run splits the layers 2,2 over its pipeline stages but "
        f"{saved}/{L.iter_dir_name(it)} holds 3,1; set num_layer_list: 3,1 or convert the weights again with "
        "--num-layer-list 2,2")


def test_load_modes_0_1_2_and_save_total_limit(env):
    data = env["sft"][0]
    first = env["root"] / "mode0"
    cfg = E.write_config(first, env["model"], data, ckpt_load_type=0, train_iters=8, save_interval=2,
                         save_total_limit=2)
    _ok(res := E.run_engine(cfg, 1))
    assert "random init (ckpt_load_type 0), iteration 0" in res.stdout
    l0 = E.losses(first)
    assert abs(l0[1] - math.log(_vocab(env["model"]))) < 0.3
    assert l0[8] < l0[1] - 0.5
    saves = first / "saved_checkpoints"
    assert sorted(p.name for p in saves.iterdir() if p.name.startswith("iter_")) == ["iter_0000006", "iter_0000008"]
    assert (saves / "latest_checkpointed_iteration.txt").read_text() == "8"

    # 1: weights only -> iteration restarts at 0 and the loss starts near the trained one.
    one = env["root"] / "mode1"
    cfg = E.write_config(one, env["model"], data, ckpt_load_type=1, user_converted_ckpt_path=str(saves),
                         train_iters=4)
    _ok(res := E.run_engine(cfg, 1))
    assert f"weights only (fresh optimizer and schedule) from {saves}/iter_0000008" in res.stdout
    l1 = E.losses(one)
    assert sorted(l1) == [1, 2, 3, 4]
    assert l1[1] < l0[1] - 0.5 and abs(l1[1] - l0[8]) < 0.5

    # 2: everything -> continues at iteration 9 with the same data position.
    two = env["root"] / "mode2"
    cfg = E.write_config(two, env["model"], data, ckpt_load_type=2, user_converted_ckpt_path=str(saves),
                         train_iters=10)
    _ok(res := E.run_engine(cfg, 1))
    assert "starting at iteration 8, consumed samples 32" in res.stdout
    l2 = E.losses(two)
    assert sorted(l2) == [9, 10] and abs(l2[9] - l0[8]) < 0.5

    # A checkpoint whose layout differs from the run's is refused naming both.
    bad = env["root"] / "mode2_tp2"
    cfg = E.write_config(bad, env["model"], data, ckpt_load_type=2, user_converted_ckpt_path=str(saves),
                         tensor_model_parallel_size=2)
    res = E.run_engine(cfg, 2)
    assert res.returncode != 0
    assert "checkpoint layout TP1 PP1 differs from the run's TP2 PP1" in res.stderr


def test_cp2_same_losses_as_cp1(env):
    """Context parallelism (each rank holds 2 of 4 sequence chunks, K/V gathered over the CP group): packed
    SFT (block-diagonal masks) and pretraining (causal, no mask tensor) match CP1 from the same weights; with
    the distributed optimizer sharded over the 2 CP ranks, one copy of the checkpoint is written."""
    ref = E.losses(_packed_run(env, 1, 1)[0])
    out, res = _packed_run(env, 1, 1, cp=2)
    assert "TP1 PP1 CP2 DP1" in res.stdout
    # CP changes only the order of the attention's sums (measured: 6e-8 relative); a wrong chunk order is 1e-4.
    _assert_same_losses(ref, E.losses(out), "packed sft CP2", rel=1e-6)
    # With TP2 and sequence parallelism on top (4 processes): each CP rank's half splits again over TP.
    _assert_same_losses(ref, E.losses(_packed_run(env, 2, 1, cp=2)[0]), "packed sft TP2 CP2", rel=1e-6)

    runs = {}
    for cp in (1, 2):
        out = env["root"] / f"pt_CP{cp}"
        cfg = E.write_config(out, env["model"], env["pt"][0], stage="pt", train_iters=4, ckpt_load_type=1,
                             user_converted_ckpt_path=str(env["conv"][(1, 1, None)]), context_parallel_size=cp,
                             use_distributed_optimizer=True, micro_batch_size=2, global_batch_size=4, save_interval=2)
        _ok(E.run_engine(cfg, cp))
        runs[cp] = out
    _assert_same_losses(E.losses(runs[1]), E.losses(runs[2]), "pretrain CP2", rel=1e-6)
    ranks = sorted(p.name for p in (runs[2] / "saved_checkpoints" / "iter_0000004").iterdir() if p.is_dir())
    assert ranks == ["mp_rank_00"]
    assert {p.name for p in (runs[2] / "saved_checkpoints" / "iter_0000004" / "mp_rank_00").iterdir()} == {
        "model_optim_rng.pt", "distrib_optim.pt"}

    # Resumed from its iteration-2 checkpoint, the CP2 run repeats iterations 3 and 4 exactly.
    resumed = env["root"] / "pt_CP2_resumed"
    shutil.copytree(runs[2] / "saved_checkpoints" / "iter_0000002", resumed / "saved_checkpoints" / "iter_0000002")
    L.write_tracker(resumed / "saved_checkpoints", 2)
    cfg = E.write_config(resumed, env["model"], env["pt"][0], stage="pt", train_iters=4, ckpt_load_type=0,
                         context_parallel_size=2, use_distributed_optimizer=True, micro_batch_size=2,
                         global_batch_size=4, train_auto_resume=True)
    _ok(E.run_engine(cfg, 2))
    ref, again = E.losses(runs[2]), E.losses(resumed)
    assert sorted(again) == [3, 4] and all(again[i] == pytest.approx(ref[i], rel=1e-6) for i in again)
    want, got = E.final_weights(runs[2]), E.final_weights(resumed)
    assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], rtol=0, atol=1e-6) for k in want)


def test_loss_only_where_labels_set(env):
    """The SFT loss ignores prompt tokens (-100) and, in packed bins, sample boundaries and padding."""
    from ascendfactory.engine.data import SFTData

    packed = SFTData(env["packed"][1], 64, seed=1, packed=True)
    s = packed[0]
    assert s["attention_mask"].shape == (1, 64, 64)
    seg_starts = (s["position_ids"] == 0).nonzero().flatten().tolist()
    assert len(seg_starts) >= 2 and seg_starts[0] == 0
    b = seg_starts[1]
    assert bool(s["attention_mask"][0, b, b - 1])  # second sample cannot see the first
    assert not bool(s["attention_mask"][0, b - 1, b - 2])
    assert s["loss_mask"][b - 1] == 0  # no target across the boundary
    plain = SFTData(env["sft"][1], 64, seed=1, packed=False)
    s = plain[0]
    assert 0 < s["loss_mask"].sum() < len(s["tokens"]) - 1
    assert torch.equal(plain[0]["tokens"], SFTData(env["sft"][1], 64, seed=1, packed=False)[0]["tokens"])
