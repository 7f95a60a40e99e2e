"""ckpt_format: torch_dist (SPEC.md section 11): megatron-core distributed checkpoints under torchrun (gloo, CPU),
published like legacy saves (manifest, tracker last, save_total_limit), resumed exactly, loaded safely."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import _engine as E
import pytest
import torch

from ascendfactory.ckpt import files as L

slow = pytest.mark.slow


def test_rules_take_a_torch_dist_checkpoint_of_any_layout(tmp_path):
    """A distributed checkpoint (recognised by its metadata.json) loads into any layout: no TP/PP refusal."""
    from test_rules import QWEN2_7B, problems

    model_dir = tmp_path / "Qwen2-7B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN2_7B))
    ck = tmp_path / "ck"
    (ck / "iter_0000001").mkdir(parents=True)
    (ck / "iter_0000001" / L.DIST_METADATA).write_text('{"sharded_backend": "torch_dist"}')
    L.write_tracker(ck, 1)
    kw = dict(ckpt_load_type=2, user_converted_ckpt_path=str(ck), ckpt_format="torch_dist")
    assert problems(tmp_path, model_dir, **kw) == []  # the export reads torch_dist too
    assert problems(tmp_path, model_dir, finetuning_type="lora", **kw) == []  # adapters sharded like their linear
    # Only megatron-core's distributed checkpoints save asynchronously.
    assert problems(tmp_path, model_dir, convert_mg2hf_at_last=False, async_save=True) == [
        "async_save = true: only ckpt_format torch_dist saves asynchronously (megatron-core's async save); "
        "set ckpt_format: torch_dist or async_save: false"]


def test_legacy_full_resume_into_another_layout_refused_naming_convert_reshard(tmp_path):
    """ckpt_load_type 2 from a legacy TP1 checkpoint, and auto-resume from a legacy TP1 PP1 save, into a TP2 run:
    one line naming both layouts and the `convert reshard` command, before anything runs; weights only is
    resharded on load (not refused); a torch_dist save in save_dir auto-resumes into any layout."""
    from test_rules import QWEN2_7B, check, cluster_layout, problems, resolved

    model_dir = tmp_path / "Qwen2-7B"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN2_7B))
    ck = tmp_path / "ck"
    (ck / "iter_0000004" / "mp_rank_00").mkdir(parents=True)
    L.write_tracker(ck, 4)
    tp2 = {"tensor-model-parallel-size": 2, "convert_mg2hf_at_last": False}
    assert problems(tmp_path, model_dir, ckpt_load_type=2, user_converted_ckpt_path=str(ck), **tp2) == [
        f"user_converted_ckpt_path {ck}: checkpoint layout TP1 PP1 differs from the run's TP2 PP1; a legacy "
        "checkpoint resumes (with its optimizer state) only into its own layout: convert it with "
        f"`ascendfactory-cli convert reshard --mg-dir {ck} --out-dir {ck}_tp2pp1 --tp 2 --pp 1` and resume from "
        f"{ck}_tp2pp1 (ckpt_load_type: 2, user_converted_ckpt_path: {ck}_tp2pp1, train_auto_resume: false), or "
        "run at TP1 PP1"]
    assert problems(tmp_path, model_dir, ckpt_load_type=1, user_converted_ckpt_path=str(ck), **tp2) == []

    cfg = resolved(tmp_path, model_dir, nproc_per_node=8, train_auto_resume=True, ckpt_format="torch_dist",
                   ckpt_load_type=0, **tp2).cfg
    from ascendfactory.config.paths import run_paths

    saved = run_paths(cfg).save_dir / "iter_0000006"
    (saved / "mp_rank_00").mkdir(parents=True)
    (saved / "mp_rank_00" / L.MODEL_FILE).write_bytes(b"x")
    (saved / L.MANIFEST).write_text(json.dumps({"tp": 1, "pp": 1, "ep": 1, "files": {f"mp_rank_00/{L.MODEL_FILE}": 1}}))
    r = resolved(tmp_path, model_dir, nproc_per_node=8, train_auto_resume=True, ckpt_format="torch_dist",
                 ckpt_load_type=0, **tp2)
    line = " ".join(check(r, cluster_layout(r.cfg, env={})).problems)
    assert line.startswith(f"train_auto_resume: {saved}: checkpoint layout TP1 PP1 differs from the run's TP2 PP1")
    assert (f"`ascendfactory-cli convert reshard --mg-dir {saved.parent} --out-dir {saved.parent}_tp2pp1 --tp 2 "
            "--pp 1 --ckpt-format torch_dist`") in line
    (saved / L.DIST_METADATA).write_text("{}")  # the same save in torch_dist: resharded on load
    assert check(r, cluster_layout(r.cfg, env={})).problems == []


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_ckpt")
    model = E.make_model(root)
    return {"root": root, "model": model, "sft": E.write_sft(root / "sft", model) and root / "sft"}


def _ok(res):
    assert res.returncode == 0, E.describe(res)


def _config(env, out, **kw):
    base = dict(train_iters=6, save_interval=2, use_distributed_optimizer=True)
    return E.write_config(out, env["model"], env["sft"], **{**base, **kw})


def _resume_from(env, run, iteration, out, nproc, **kw):
    """A fresh output dir holding only `run`'s checkpoint `iteration`, auto-resumed."""
    shutil.copytree(run / "saved_checkpoints" / L.iter_dir_name(iteration),
                    out / "saved_checkpoints" / L.iter_dir_name(iteration))
    L.write_tracker(out / "saved_checkpoints", iteration)
    res = E.run_engine(_config(env, out, train_auto_resume=True, **kw), nproc)
    _ok(res)
    return res


def _same(ref: dict, got: dict, rel: float, what: str):
    assert got and all(got[i] == pytest.approx(ref[i], rel=rel) for i in got), (what, ref, got)


def _dp2_runs(env) -> dict:
    """The DP2 runs the tests share (legacy and torch_dist, the newest two checkpoints kept), run on first use."""
    if "dp2" not in env:
        for fmt in ("legacy", "torch_dist"):
            out = env["root"] / fmt
            _ok(E.run_engine(_config(env, out, ckpt_format=fmt, save_total_limit=2), 2))
        env["dp2"] = {fmt: env["root"] / fmt for fmt in ("legacy", "torch_dist")}
    return env["dp2"]


@slow
def test_torch_dist_same_layout_round_trip_equals_legacy(env):
    """DP2 with the distributed optimizer: the torch_dist run trains exactly as the legacy one, its folders hold
    megatron-core's files under a manifest with checksums, save_total_limit keeps the newest two, and a resume
    from its iteration-4 checkpoint repeats iterations 5 and 6 (RNG, optimizer, LR, data position restored)."""
    runs = _dp2_runs(env)
    legacy, dist_ = E.losses(runs["legacy"]), E.losses(runs["torch_dist"])
    assert sorted(dist_) == [1, 2, 3, 4, 5, 6]
    _same(legacy, dist_, 1e-6, "torch_dist vs legacy training")

    saves = runs["torch_dist"] / "saved_checkpoints"
    assert sorted(p.name for p in saves.iterdir() if p.name.startswith("iter_")) == ["iter_0000004", "iter_0000006"]
    assert L.read_tracker(saves) == 6
    it6 = saves / "iter_0000006"
    names = {p.name for p in it6.iterdir()}
    assert {"metadata.json", "common.pt", ".metadata", "manifest.json"} <= names
    assert any(n.endswith(".distcp") for n in names) and not any(n.startswith("mp_rank_") for n in names)
    manifest = json.loads((it6 / "manifest.json").read_text())
    assert set(manifest["crc32"]) == set(manifest["files"]) == names - {"manifest.json"}

    resumed = env["root"] / "torch_dist_resumed"
    res = _resume_from(env, runs["torch_dist"], 4, resumed, 2, ckpt_format="torch_dist")
    assert "starting at iteration 4, consumed samples 16" in res.stdout
    again = E.losses(resumed)
    assert sorted(again) == [5, 6]
    _same(legacy, again, 1e-6, "torch_dist resume vs uninterrupted legacy")
    lr = {r["iteration"]: r["lr"] for r in E.metrics(runs["legacy"])}
    assert all(r["lr"] == pytest.approx(lr[r["iteration"]], rel=1e-9) for r in E.metrics(resumed))


@slow
def test_lora_run_takes_torch_dist_weights(env):
    """ckpt_load_type 1 from a torch_dist checkpoint into a LoRA run: the base weights load (resharded, DP2 -> 1),
    the adapters start fresh, so the first loss is the trained model's, not a random one's."""
    out = env["root"] / "lora_from_dist"
    cfg = E.write_config(out, env["model"], env["sft"], train_iters=2, finetuning_type="lora", lora_r=4,
                         lora_alpha=8, ckpt_load_type=1,
                         user_converted_ckpt_path=str(_dp2_runs(env)["torch_dist"] / "saved_checkpoints"))
    _ok(res := E.run_engine(cfg, 1))
    assert "weights only (fresh optimizer and schedule)" in res.stdout
    trained = E.losses(_dp2_runs(env)["torch_dist"])
    assert E.losses(out)[1] == pytest.approx(trained[6], abs=0.5) and E.losses(out)[1] < trained[1] - 0.5


@slow
def test_kill_during_torch_dist_save_and_crafted_common_pt(env, tmp_path):
    """kill -9 while the iteration-6 shards are written: only the temporary folder exists, the tracker still names
    iteration 4, and auto-resume continues from it exactly. A common.pt carrying code is refused with one line
    naming it (megatron-core's own loader would unpickle it in full)."""
    out = env["root"] / "killed"
    res = E.run_engine(_config(env, out, ckpt_format="torch_dist", train_auto_resume=True), 2,
                       ASCENDFACTORY_TEST_KILL_AT="save_files:6")
    assert res.returncode != 0, E.describe(res)
    save = out / "saved_checkpoints"
    assert L.read_tracker(save) == 4 and (save / ".tmp_iter_0000006").is_dir() and not (save / "iter_0000006").exists()
    res = E.run_engine(_config(env, out, ckpt_format="torch_dist", train_auto_resume=True), 2)
    _ok(res)
    assert "checkpoint iteration 4; starting at iteration 4" in res.stdout
    _same(E.losses(_dp2_runs(env)["legacy"]), E.losses(out), 1e-6, "killed torch_dist run, resumed")
    assert L.read_tracker(save) == 6 and not (save / ".tmp_iter_0000006").exists()

    from test_safety import OPENER, craft, reseal

    marker = tmp_path / "pwned"
    crafted = env["root"] / "crafted"
    shutil.copytree(save / "iter_0000004", crafted / "saved_checkpoints" / "iter_0000004")
    L.write_tracker(crafted / "saved_checkpoints", 4)
    common = crafted / "saved_checkpoints" / "iter_0000004" / "common.pt"
    craft(common, marker)
    reseal(common.parent)
    res = E.run_engine(_config(env, crafted, ckpt_format="torch_dist", train_auto_resume=True), 2)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and errors, E.describe(res)
    assert errors[0].startswith(f"error: {common}: refused to load type {OPENER}"), E.describe(res)
    assert not marker.exists() and not E.losses(crafted)


@slow
def test_resume_torch_dist_into_another_layout(env):
    """TP2 PP2 (world 4, saved with async_save: published when megatron-core's writer processes finish) into
    TP1 PP1 DP2 and into CP2, and TP1 PP1 DP2 into TP2 PP2: weights and optimizer resharded by megatron-core,
    iteration, consumed samples and LR continued, RNG re-seeded with a log line; the losses after the resume equal
    the uninterrupted run's."""
    tp2pp2 = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, ckpt_format="torch_dist")
    src = env["root"] / "TP2PP2"
    _ok(res := E.run_engine(_config(env, src, async_save=True, **tp2pp2), 4))
    assert "checkpoint iteration 4: writing in the background (async_save)" in res.stdout
    assert L.read_tracker(src / "saved_checkpoints") == 6
    for run, into, nproc, kw in [(src, "TP2PP2_into_DP2", 2, {"ckpt_format": "torch_dist"}),
                                 (src, "TP2PP2_into_CP2", 2, {"context_parallel_size": 2}),
                                 (_dp2_runs(env)["torch_dist"], "DP2_into_TP2PP2", 4, tp2pp2)]:
        out = env["root"] / into
        res = _resume_from(env, run, 4, out, nproc, **kw)
        assert "starting at iteration 4, consumed samples 16" in res.stdout
        assert "RNG states re-seeded" in res.stdout
        _same(E.losses(run), E.losses(out), 1e-5, into)
        lr = {r["iteration"]: r["lr"] for r in E.metrics(run)}
        assert all(r["lr"] == pytest.approx(lr[r["iteration"]], rel=1e-9) for r in E.metrics(out))


@slow
def test_reshard_full_legacy_to_torch_dist_and_to_legacy_tp1pp2(env, tmp_path):
    """`convert reshard` (engine/reshard.py for a training checkpoint) on the legacy DP2 run's iteration-4
    checkpoint (distributed optimizer): into torch_dist (one run) resumed at TP2, and into legacy TP1 PP2 (through
    torch_dist, two runs) resumed at PP2, each with ckpt_load_type 2 continuing as the uninterrupted run."""
    src = tmp_path / "src"
    shutil.copytree(_dp2_runs(env)["legacy"] / "saved_checkpoints" / "iter_0000004", src / "iter_0000004")
    L.write_tracker(src, 4)
    for dst, fmt in [("dist", "torch_dist"), ("pp2", "legacy")]:
        r = subprocess.run([sys.executable, "-m", "ascendfactory", "convert", "reshard", "--mg-dir", str(src),
                            "--out-dir", str(tmp_path / dst), "--tp", "1", "--pp", "2", "--ckpt-format", fmt],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "holds optimizer state: resharding it in full" in r.stderr + r.stdout
    assert L.is_torch_dist(tmp_path / "dist" / "iter_0000004")
    assert sorted(p.name for p in (tmp_path / "pp2" / "iter_0000004").glob("mp_rank_*")) == [
        "mp_rank_00_000", "mp_rank_00_001"]
    for dst, layout in [("dist", {"tensor_model_parallel_size": 2}), ("pp2", {"pipeline_model_parallel_size": 2})]:
        out = tmp_path / f"resumed_{dst}"
        _ok(res := E.run_engine(_config(env, out, ckpt_load_type=2, user_converted_ckpt_path=str(tmp_path / dst),
                                        **layout), 2))
        assert "starting at iteration 4, consumed samples 16" in res.stdout
        _same(E.losses(_dp2_runs(env)["legacy"]), E.losses(out), 1e-5, dst)


@slow
def test_moe_torch_dist_at_ep2_resumes_at_ep1(tmp_path):
    """A tiny MoE saved torch_dist at EP2 (expert optimizer state sharded over EP) resumes at EP1 x DP2 with the
    uninterrupted run's losses."""
    model = E.make_model(tmp_path, "qwen3_moe", seed=3, mlp_only_layers=[1])
    data = E.write_sft(tmp_path / "sft", model) and tmp_path / "sft"
    kw = dict(train_iters=6, save_interval=3, use_distributed_optimizer=True, micro_batch_size=1,
              ckpt_format="torch_dist")
    ep2 = tmp_path / "ep2"
    _ok(E.run_engine(E.write_config(ep2, model, data, expert_model_parallel_size=2, **kw), 2, timeout=600))
    out = tmp_path / "ep1"
    shutil.copytree(ep2 / "saved_checkpoints" / "iter_0000003", out / "saved_checkpoints" / "iter_0000003")
    L.write_tracker(out / "saved_checkpoints", 3)
    _ok(res := E.run_engine(E.write_config(out, model, data, train_auto_resume=True, **kw), 2, timeout=600))
    assert "starting at iteration 3" in res.stdout and "RNG states re-seeded" in res.stdout
    assert sorted(E.losses(out)) == [4, 5, 6]
    _same(E.losses(ep2), E.losses(out), 1e-5, "EP2 -> EP1")


def test_crafted_dcp_index_refused_real_one_read(tmp_path):
    """torch.distributed.checkpoint unpickles .metadata in full: a crafted one is refused before that, naming it;
    the records torch writes are read."""
    import pickle

    from test_safety import OPENER, Payload
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ascendfactory.ckpt.dist import read_index
    from ascendfactory.ckpt.files import DCP_INDEX as DCP_METADATA
    from ascendfactory.errors import UserError

    real = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([2]), [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))])})
    (tmp_path / DCP_METADATA).write_bytes(pickle.dumps(real))
    read_index(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / DCP_METADATA).write_bytes(pickle.dumps({"index": real, "payload": Payload(marker)}))
    with pytest.raises(UserError, match=rf"{DCP_METADATA}: refused to load type {OPENER}"):
        read_index(tmp_path)
    assert not marker.exists()
