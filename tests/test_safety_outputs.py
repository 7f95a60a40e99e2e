"""Issue 10: only what this output_dir's runs made is ever replaced or deleted, nothing is written through a link
out of output_dir, and runs do not mix (a run's identity is in run.json and in every checkpoint manifest).
Refusals come before any stage: exit 2, one line each naming the key or file and the fix, the user's files
unchanged."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import _engine as E
import pytest
import yaml

from ascendfactory import tiny
from ascendfactory.ckpt import files as L

pytestmark = pytest.mark.slow  # CLI subprocesses (plan / train) per case: the full suite only

ITERS = 6  # the earlier run: checkpoints iter_0000003 and iter_0000006


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tiny.make_tiny_model(root / "user" / "model", "qwen2")
    tiny.write_instruction_data(root / "user" / "data.jsonl", n=16)
    return root


def write_cfg(root: Path, out: Path, **exp) -> Path:
    base = {"device": "cpu", "nproc_per_node": 1, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 1,
            "global-batch-size": 2, "train-iters": ITERS, "save-interval": 3, "tensor-model-parallel-size": 1,
            "prompt_type": "qwen"}
    cfg = {"base": base, "tiny": {"model_name_or_path": str(root / "user" / "model"),
                                  "dataset": str(root / "user" / "data.jsonl"), "output_dir": str(out), "exp": exp}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(command: str, cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ascendfactory", command, str(cfg), "tiny", "exp", *args],
                          capture_output=True, text=True, timeout=600)


def refused(r: subprocess.CompletedProcess, *needles: str) -> list[str]:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    for needle in needles:
        assert any(needle in line for line in errors), (needle, r.stderr)
    return errors


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def finished(assets):
    """A real run (train_auto_resume false): preprocess, convert, 6 iterations saved at 3 and 6, export."""
    out = assets / "finished"
    r = cli("train", write_cfg(assets, out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_export_never_replaces_the_model_it_starts_from(assets, finished):
    """hf_save_dir = the user's earlier export, used as model_name_or_path: refused even with --overwrite."""
    earlier = assets / "user" / "earlier_export"
    shutil.copytree(finished / "converted_mg2hf_weight", earlier)  # a complete export, with our marker
    before = snapshot(earlier)
    out = assets / "from_export"
    cfg = write_cfg(assets, out, model_name_or_path=str(earlier), hf_save_dir=str(earlier))
    refused(cli("plan", cfg, "--overwrite"), f"hf_save_dir {earlier}: replacing it would replace model_name_or_path")
    refused(cli("train", cfg, "--overwrite"), "choose another hf_save_dir")
    assert snapshot(earlier) == before and not out.exists()


def test_export_never_replaces_a_convert_hf2mg_folder(assets):
    from ascendfactory.convert.api import hf_to_megatron

    mg = assets / "user" / "mg_tp1"
    hf_to_megatron(assets / "user" / "model", mg, tp=1, pp=1)
    (mg / "NOTES.txt").write_text("how I made these weights")
    before = snapshot(mg)
    out = assets / "into_hf2mg"
    cfg = write_cfg(assets, out, hf_save_dir=str(mg))
    line = f"hf_save_dir {mg}: holds a conversion (of {assets / 'user' / 'model'}) that no run in output_dir {out} made"
    refused(cli("plan", cfg), line)
    refused(cli("train", cfg), line, "set overwrite_output: true")
    assert snapshot(mg) == before and not out.exists()


def test_output_dir_holding_the_users_files_needs_overwrite_output(assets):
    out = assets / "user" / "results"
    out.mkdir()
    (out / "exp-config.yaml").write_text("my: notes\n")
    (out / "training_loss.png").write_bytes(b"my plot")
    (out / "logs").mkdir()
    (out / "logs" / "metrics.jsonl").write_text('{"step": 1, "value": 0.5}\n')
    before = snapshot(out)
    cfg = write_cfg(assets, out)
    line = (f"output_dir {out}: holds files that no ascendfactory run wrote (exp-config.yaml, logs, training_loss.png); "
            "choose a new or empty output_dir, or set overwrite_output: true (--overwrite) to write into it")
    refused(cli("plan", cfg), line)
    refused(cli("train", cfg), line)
    assert snapshot(out) == before
    r = cli("plan", cfg, "--overwrite", "--json")  # `--overwrite` spells overwrite_output: true
    assert r.returncode == 0 and json.loads(r.stdout)["config"]["overwrite_output"] is True, r.stderr


def test_foreign_rows_in_metrics_jsonl_are_not_plotted(tmp_path):
    """With overwrite_output the run appends to such a file: its own rows are read, the user's are left alone."""
    from ascendfactory.engine.metrics import plot_loss, read_losses

    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "value": 0.5}\n[1, 2]\n{"iteration": 1, "loss": 2.5}\n{"iteration": 2, "loss": 2.0}\n')
    assert read_losses(m) == {1: 2.5, 2: 2.0}
    pytest.importorskip("matplotlib")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my plot")
    (tmp_path / "training_loss.png").symlink_to(mine)
    assert plot_loss(m, tmp_path / "training_loss.png")  # a new file in place of the link, not through it
    assert mine.read_bytes() == b"my plot" and not (tmp_path / "training_loss.png").is_symlink()


def test_links_out_of_output_dir_are_refused(assets, tmp_path):
    outside = assets / "user" / "outside.jsonl"
    outside.write_text("precious\n")
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "metrics.jsonl").symlink_to(outside)
    (out / "saved_checkpoints").symlink_to(assets / "user")
    (out / "logs" / "inside.log").symlink_to(out / "other.log")  # within output_dir: fine
    (out / "logs" / "loop").symlink_to("loop")
    cfg = write_cfg(assets, out)
    lines = (f"{out / 'logs' / 'metrics.jsonl'}: a symbolic link to {outside}, outside output_dir {out}",
             f"{out / 'saved_checkpoints'}: a symbolic link to {assets / 'user'}", f"{out / 'logs' / 'loop'}: ")
    refused(cli("plan", cfg, "--overwrite"), *lines)
    errors = refused(cli("train", cfg, "--overwrite"), *lines)
    assert len(errors) == 3 and all(e.endswith("remove the link or choose another output_dir") for e in errors)
    assert outside.read_text() == "precious\n" and not (out / "exp-config.yaml").exists()


def test_fresh_run_over_an_earlier_runs_checkpoints_is_refused(finished):
    cfg = finished.parent / f"{finished.name}.yaml"
    save = finished / "saved_checkpoints"
    state = json.loads((finished / ".ascendfactory" / "run.json").read_text())
    assert state["run_id"] == L.manifest_run_id(save / "iter_0000006") == L.manifest_run_id(save / "iter_0000003")
    before = snapshot(save)
    # the same config again: the finished run is at home there, every stage is skipped
    r = cli("train", cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("preprocess", "convert", "train", "export"):
        assert f"{stage}: skipped" in r.stdout, r.stdout
    # another config (seed 7), no auto-resume: it would start over among the earlier run's checkpoints
    line = (f"{save}: holds checkpoints of an earlier run (iter_0000006, iter_0000003) and train_auto_resume is "
            "false, so this run would start over among them; set train_auto_resume: true to continue from them, "
            "or choose another output_dir")
    refused(cli("plan", cfg, "--seed=7"), line)
    refused(cli("train", cfg, "--seed=7"), line)
    assert snapshot(save) == before
    assert cli("plan", cfg, "--seed=7", "--train_auto_resume=true").returncode == 0  # continuing them: as asked


def _other_run(finished: Path, out: Path, **kw) -> Path:
    """The engine in an output_dir holding the finished run's checkpoints, with another config (seed 7)."""
    shutil.copytree(finished / "saved_checkpoints", out / "saved_checkpoints")
    return E.write_config(out, finished.parent / "user" / "model", finished / "preprocessed_data", seed=7,
                          train_iters=4, save_interval=2, micro_batch_size=1, global_batch_size=2,
                          use_distributed_optimizer=True, **kw)


@pytest.mark.slow
def test_save_total_limit_deletes_only_this_runs_checkpoints(finished, tmp_path):
    out = tmp_path / "limit"
    cfg = _other_run(finished, out, save_total_limit=1)
    theirs = {it: snapshot(out / "saved_checkpoints" / it) for it in ("iter_0000003", "iter_0000006")}
    res = E.run_engine(cfg, 1)
    assert res.returncode == 0, E.describe(res)
    save = out / "saved_checkpoints"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000003", "iter_0000004", "iter_0000006"]
    assert {it: snapshot(save / it) for it in theirs} == theirs
    assert L.read_tracker(save) == 4
    ours, theirs_id = L.manifest_run_id(save / "iter_0000004"), L.manifest_run_id(save / "iter_0000006")
    assert ours is not None and ours != theirs_id


@pytest.mark.slow
def test_torchrun_restart_resumes_only_from_this_runs_checkpoint(finished, tmp_path):
    """Killed after its iteration-2 save: the restarted workers resume from it, not from the earlier run's
    (newer) iteration 6, with which they would be 'done' at once and exit 0."""
    out = tmp_path / "restart"
    cfg = _other_run(finished, out)
    res = E.run_engine(cfg, 1, torchrun_args=("--max-restarts", "1"), ASCENDFACTORY_TEST_KILL_AT="after_save:2:1")
    assert res.returncode == 0, E.describe(res)
    assert "torchrun restart 1: resuming" in res.stdout
    assert "checkpoint iteration 2; starting at iteration 2" in res.stdout, E.describe(res)
    assert sorted(E.losses(out)) == [1, 2, 3, 4]
    assert L.read_tracker(out / "saved_checkpoints") == 4
