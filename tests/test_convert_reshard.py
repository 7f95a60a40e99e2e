"""`convert reshard`: any TP/PP/EP and format -> any, streaming, bit-exact; megatron-core loads what it writes in
torch_dist at another layout; and the weights-only load (ckpt_load_type 1) of a legacy checkpoint of another
layout, resharded by the convert stage instead of refused."""

from __future__ import annotations

import json
import shutil

import _engine as E
import pytest
import torch
from _dist_ckpts import assert_same_checkpoint, assert_same_tensors, hf_tensors, run_worker

from ascendfactory.ckpt.files import iter_dir_name, rank_file
from ascendfactory.ckpt.reader import read_checkpoint_layout
from ascendfactory.cli import main
from ascendfactory.config.loader import load_resolved
from ascendfactory.config.paths import run_paths
from ascendfactory.convert import stage as convert_stage
from ascendfactory.convert.api import megatron_to_hf
from ascendfactory.pipeline import decide_train

slow = pytest.mark.slow


def reshard(capsys, src, dst, *flags) -> str:
    """`convert reshard` in this process; its stderr."""
    with pytest.raises(SystemExit) as e:
        main(["convert", "reshard", "--mg-dir", str(src), "--out-dir", str(dst), *map(str, flags)])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    return err


def reshard_error(capsys, src, dst, *flags) -> str:
    with pytest.raises(SystemExit) as e:
        main(["convert", "reshard", "--mg-dir", str(src), "--out-dir", str(dst), *map(str, flags)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@slow
def test_reshard_both_directions_and_formats_bit_exact(dist_ckpts, tmp_path, capsys):
    """legacy TP2 PP2 -> TP1 PP1 -> TP2 PP2, and legacy -> torch_dist -> legacy, give back the same bytes (MoE:
    TP2 EP2 -> TP1 PP2 EP2 -> torch_dist -> TP2 EP2); megatron-core's own torch_dist save converts to the legacy
    checkpoint it was saved from; megatron-core loads the torch_dist we write into GPTModels at another TP (and
    PP / EP) than its source, with the same weights as the legacy checkpoint of that layout."""
    d, m = dist_ckpts, tmp_path
    reshard(capsys, d["dense_legacy"], m / "d11", "--tp", 1, "--pp", 1)
    assert read_checkpoint_layout(m / "d11").describe() == "TP1 PP1 layers [4]"
    reshard(capsys, m / "d11", m / "d22", "--tp", 2, "--pp", 2)
    assert_same_checkpoint(d["dense_legacy"], m / "d22")
    err = reshard(capsys, d["dense_legacy"], m / "d_dist", "--tp", 1, "--pp", 1, "--ckpt-format", "torch_dist")
    assert "optimizer" not in err  # converted weights: nothing dropped
    reshard(capsys, m / "d_dist", m / "d_back", "--tp", 2, "--pp", 2)
    assert_same_checkpoint(d["dense_legacy"], m / "d_back")
    reshard(capsys, d["dense_dist"], m / "d_from_mcore", "--tp", 2, "--pp", 2)
    assert_same_checkpoint(d["dense_legacy"], m / "d_from_mcore")

    reshard(capsys, d["moe_legacy"], m / "m122", "--tp", 1, "--pp", 2, "--ep", 2)
    reshard(capsys, m / "m122", m / "m_dist", "--tp", 2, "--ep", 2, "--ckpt-format", "torch_dist")
    reshard(capsys, m / "m_dist", m / "m_back", "--tp", 2, "--ep", 2)
    assert_same_checkpoint(d["moe_legacy"], m / "m_back")
    reshard(capsys, d["moe_dist"], m / "m_from_mcore", "--tp", 2, "--ep", 2)
    assert_same_checkpoint(d["moe_legacy"], m / "m_from_mcore")

    jobs = [{"mode": "load", "dist": m / "d_dist", "legacy": m / "d11", "hf_dir": d["dense_hf"],
             "result": m / "dense.json"},
            {"mode": "load", "dist": m / "m_dist", "legacy": m / "m122", "hf_dir": d["moe_hf"],
             "result": m / "moe.json"}]
    run_worker(jobs, 4, tmp_path)
    for kind in ("dense", "moe"):
        result = json.loads((m / f"{kind}.json").read_text())
        assert result["mismatched"] == 0 and result["tensors"] > 10, result
    assert json.loads((m / "dense.json").read_text())["tp"] == 1  # source TP2
    assert json.loads((m / "moe.json").read_text())["layout"] == "TP1 PP2 EP2 layers [2, 2]"  # source TP2 PP1


@slow
def test_reshard_weights_only_of_a_training_checkpoint(dist_ckpts, tmp_path, capsys):
    """--weights-only on a source holding optimizer state (a training save): the weights alone are converted."""
    src = tmp_path / "trained"
    shutil.copytree(dist_ckpts["dense_legacy"], src)
    for t in range(2):
        for p in range(2):
            f = rank_file(src, 1, t, p, 2)
            content = torch.load(f, weights_only=False)
            content.update(optimizer={"step": 1}, opt_param_scheduler={}, rng_state=[])
            torch.save(content, f)
    err = reshard(capsys, src, tmp_path / "out", "--tp", 1, "--weights-only")
    assert "optimizer state" not in err
    assert "optimizer" not in torch.load(rank_file(tmp_path / "out", 1, 0, 0, 1), weights_only=False)


@slow
def test_reshard_bad_input_exit_2(dist_ckpts, tmp_path, capsys):
    """Missing folder, a folder that is no checkpoint, layouts that do not divide heads / layers / experts, an
    output folder that is not ours: one line, exit 2, nothing written."""
    d = dist_ckpts
    out = tmp_path / "out"
    assert reshard_error(capsys, tmp_path / "nope", out) == \
        f"error: {tmp_path / 'nope'}: checkpoint directory does not exist"
    assert "tracker file missing" in reshard_error(capsys, d["dense_hf"], out)
    assert "--tp: 3 does not divide num_attention_heads=4" in reshard_error(capsys, d["dense_legacy"], out,
                                                                           "--tp", 3)
    assert "--pp: 3 does not divide num_hidden_layers=4" in reshard_error(capsys, d["dense_dist"], out, "--pp", 3)
    assert "--ep: 3 does not divide the 4 experts" in reshard_error(capsys, d["moe_dist"], out, "--ep", 3)
    assert "--ep: 2 needs a Mixture-of-Experts model" in reshard_error(capsys, d["dense_legacy"], out, "--ep", 2)
    assert "--ckpt-format: 'zarr'" in reshard_error(capsys, d["dense_legacy"], out, "--ckpt-format", "zarr")
    assert "is the source checkpoint" in reshard_error(capsys, d["dense_legacy"], d["dense_legacy"])
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "holds no ascendfactory conversion" in reshard_error(capsys, d["dense_legacy"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    moved = tmp_path / "moved"  # the source model's config.json is not where the args say
    shutil.copytree(d["dense_legacy"], moved)
    cfg_dir = tmp_path / "cfg"
    shutil.copytree(d["dense_hf"], cfg_dir)
    (cfg_dir / "config.json").unlink()
    assert "config.json missing; pass --hf-config-dir" in reshard_error(capsys, moved, tmp_path / "o2",
                                                                       "--hf-config-dir", cfg_dir)


@slow
def test_weights_only_load_of_another_layout_is_resharded(dist_ckpts, tmp_path):
    """ckpt_load_type 1 from a legacy TP2 PP2 checkpoint into a TP1 PP1 run: the convert stage writes its weights
    at the run's layout into <output_dir>/resharded_TP1PP1 (the HF weights bit for bit), and the run trains from
    there."""
    d = dist_ckpts
    out = tmp_path / "run"
    data = E.write_sft(tmp_path / "sft", d["dense_hf"])
    config = E.write_config(out, d["dense_hf"], tmp_path / "sft", ckpt_load_type=1, train_iters=2,
                            user_converted_ckpt_path=str(d["dense_legacy"]))
    assert data
    cfg = load_resolved(config)
    paths = run_paths(cfg)
    assert paths.converted_ckpt_dir == out / "resharded_TP1PP1"
    assert decide_train(cfg, paths)[1].endswith(
        f"; a legacy checkpoint at TP2 PP2, resharded by the convert stage from {d['dense_legacy']}")
    mcore = cfg.model_copy(update={"user_converted_ckpt_path": str(d["dense_dist"])})
    assert run_paths(mcore).converted_ckpt_dir == d["dense_dist"]  # megatron-core reshards it on load
    assert decide_train(mcore, run_paths(mcore))[1].endswith(
        "; a torch_dist checkpoint: megatron-core reshards it into the run's layout on load")
    run, reason = convert_stage.decide_convert(cfg, paths)
    assert run and reason == (f"weights of {d['dense_legacy']} (TP2 PP2) resharded -> {out / 'resharded_TP1PP1'} "
                              "(ckpt_load_type 1)")
    convert_stage.run_convert(cfg, paths)
    assert convert_stage.decide_convert(cfg, paths)[0] is False  # done once
    megatron_to_hf(paths.converted_ckpt_dir, tmp_path / "hf", d["dense_hf"])
    assert_same_tensors(hf_tensors(d["dense_hf"]), hf_tensors(tmp_path / "hf"))
    res = E.run_engine(config, 1)
    assert res.returncode == 0, E.describe(res)
    assert f"weights only (fresh optimizer and schedule) from {out / 'resharded_TP1PP1' / iter_dir_name(1)}" \
        in res.stdout, E.describe(res)
    assert sorted(E.losses(out)) == [1, 2]


@slow
def test_weights_only_load_of_another_layer_split_is_resharded(dist_ckpts, tmp_path):
    """The same TP / PP but the layers split otherwise (converted with num_layer_list 1,3, the run splits 2,2): the
    convert stage reshards the weights into the run's split (bit for bit), `plan`'s reason names both splits, and
    the PP2 run trains from them."""
    from ascendfactory.convert.api import hf_to_megatron

    d = dist_ckpts
    src = tmp_path / "split_1_3"
    hf_to_megatron(d["dense_hf"], src, 1, 2, [1, 3])
    out = tmp_path / "run"
    assert E.write_sft(tmp_path / "sft", d["dense_hf"])
    config = E.write_config(out, d["dense_hf"], tmp_path / "sft", ckpt_load_type=1, train_iters=2,
                            pipeline_model_parallel_size=2, user_converted_ckpt_path=str(src))
    cfg = load_resolved(config)
    paths = run_paths(cfg)
    assert paths.converted_ckpt_dir == out / "resharded_TP1PP2"
    assert decide_train(cfg, paths)[1].endswith(
        f"; a legacy checkpoint at TP1 PP2 with layers per stage [1, 3] (the run's: [2, 2]), resharded by the convert "
        f"stage from {src}")
    run, reason = convert_stage.decide_convert(cfg, paths)
    assert run and reason == (f"weights of {src} (TP1 PP2, layers per stage [1, 3]) resharded -> "
                              f"{out / 'resharded_TP1PP2'} (ckpt_load_type 1)")
    convert_stage.run_convert(cfg, paths)
    assert read_checkpoint_layout(paths.converted_ckpt_dir).layers == (2, 2)
    megatron_to_hf(paths.converted_ckpt_dir, tmp_path / "hf", d["dense_hf"])
    assert_same_tensors(hf_tensors(d["dense_hf"]), hf_tensors(tmp_path / "hf"))
    res = E.run_engine(config, 2)
    assert res.returncode == 0, E.describe(res)
    assert sorted(E.losses(out)) == [1, 2]
    # the run's own split: nothing to reshard
    same = cfg.model_copy(update={"num_layer_list": "1,3"})
    assert run_paths(same).converted_ckpt_dir == src
