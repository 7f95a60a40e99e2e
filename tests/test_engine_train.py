"""The engine under torchrun (gloo, CPU): pretrain and SFT, TP2 / PP2 / DP2 with the distributed optimizer,
the three load modes, save_total_limit. Tiny Qwen2-shaped model, a few iterations each."""

from __future__ import annotations

import math

import pytest
import torch

import _engine as E

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_train")
    model = E.make_model(root)
    from ascendfactory.convert.api import hf_to_megatron

    conv = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        conv[(tp, pp)] = root / f"converted_TP{tp}PP{pp}"
        hf_to_megatron(str(model), str(conv[(tp, pp)]), tp, pp, None, None, None)
    return {
        "root": root,
        "model": model,
        "sft": (root / "sft", E.write_sft(root / "sft", model)),
        "packed": (root / "packed", E.write_sft(root / "packed", model, pack_len=64)),
        "pt": (root / "pt", E.write_pretrain(root / "pt", model)),
        "conv": conv,
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


def test_same_losses_tp1_tp2_pp2_from_converted_weights(env):
    """Packed SFT from the converted HF weights: TP2 (sequence parallel) and PP2 (1F1B) match TP1."""
    runs = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        out = env["root"] / f"packed_TP{tp}PP{pp}"
        cfg = E.write_config(out, env["model"], env["packed"][0], pack=True, ckpt_load_type=1,
                             user_converted_ckpt_path=str(env["conv"][(tp, pp)]), tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, sequence_parallel=tp > 1, train_iters=5)
        _ok(res := E.run_engine(cfg, tp * pp))
        assert f"from {env['conv'][(tp, pp)]}/iter_0000001" in res.stdout
        runs[(tp, pp)] = E.losses(out)
    ref = runs[(1, 1)]
    assert sorted(ref) == [1, 2, 3, 4, 5] and ref[5] < ref[1]
    for layout in [(2, 1), (1, 2)]:
        for it, loss in runs[layout].items():
            assert loss == pytest.approx(ref[it], rel=1e-4), (layout, it, loss, ref[it])


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


def test_cp2_refused_on_cpu(env):
    out = env["root"] / "cp2"
    cfg = E.write_config(out, env["model"], env["sft"][0], context_parallel_size=2)
    res = E.run_engine(cfg, 2)
    assert res.returncode != 0
    assert "context_parallel_size: CP > 1 needs Transformer Engine" in res.stderr


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
