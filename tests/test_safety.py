"""Issue 10, checkpoints: a crafted checkpoint file never runs its code (weights_only loading with an allow-list,
unless trust_checkpoint), and damaged checkpoints (same-size corruption, a bad distrib_optim.pt, a tracker naming
a missing iteration or holding garbage) are skipped or refused with one line naming the file."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import _engine as E
import pytest
import torch
import yaml

from ascendfactory.ckpt import files as L
from ascendfactory.convert.api import hf_to_megatron

pytestmark = pytest.mark.slow


class Payload:
    """What an attacker would put into a checkpoint: unpickling it creates a file (a stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


OPENER = f"{open.__module__}.{open.__qualname__}"  # the global the payload's pickle names


def craft(f: Path, marker: Path) -> None:
    """Add the payload to a real rank file, keeping the rest intact (so that, trusted, it loads and works)."""
    content = torch.load(f, map_location="cpu", weights_only=False)
    content["payload"] = Payload(marker)
    torch.save(content, f)


def reseal(iter_path: Path) -> None:
    """Give the manifest the tampered files' sizes and checksums, as an attacker who knows the format would."""
    manifest = json.loads((iter_path / "manifest.json").read_text())
    for rel in manifest["files"]:
        data = (iter_path / rel).read_bytes()
        manifest["files"][rel] = len(data)
        manifest["crc32"][rel] = zlib.crc32(data)
    (iter_path / "manifest.json").write_text(json.dumps(manifest))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ascendfactory", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=E.engine_env())


def one_error(res) -> str:
    assert res.returncode == 2, E.describe(res)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, E.describe(res)
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, its data, its converted weights and a 4-iteration training run saving at 2 and 4."""
    root = tmp_path_factory.mktemp("safety")
    model = E.make_model(root)
    data = root / "sft"
    E.write_sft(data, model)
    hf_to_megatron(model, root / "mg", tp=1, pp=1)
    ref = root / "reference"
    res = E.run_engine(_config(ref, model, data), 1)
    assert res.returncode == 0, E.describe(res)
    return {"root": root, "model": model, "data": data, "mg": root / "mg", "ref": ref}


def _config(out, model, data, **kw):
    base = dict(train_iters=4, save_interval=2, train_auto_resume=True, use_distributed_optimizer=True,
                global_batch_size=4, micro_batch_size=2)
    base.update(kw)
    return E.write_config(out, model, data, **base)


def _copy_run(env, name: str) -> Path:
    out = env["root"] / name
    shutil.copytree(env["ref"] / "saved_checkpoints", out / "saved_checkpoints")
    return out


def _pipeline_cfg(env, out: Path, **exp) -> Path:
    cfg = {"base": {"device": "cpu", "nproc_per_node": 1, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 2,
                    "global-batch-size": 4, "train-iters": 4, "save-interval": 2, "tensor-model-parallel-size": 1,
                    "use_distributed_optimizer": True},
           "tiny": {"model_name_or_path": str(env["model"]), "processed_data_dir": str(env["data"]),
                    "output_dir": str(out), "exp": exp}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- code execution


def test_own_saves_and_mindspeed_namespace_args_load_safely(env, tmp_path):
    """The allow-list covers what real files hold: our training saves (numpy RNG state, optimizer, scheduler)
    and MindSpeed-LLM's argparse.Namespace args with a torch.dtype and megatron-core's AttnBackend enum."""
    from megatron.core.transformer.enums import AttnBackend

    from ascendfactory.ckpt.reader import load_file, rank_args, read_checkpoint_layout

    saved = L.rank_file(env["ref"] / "saved_checkpoints", 4, 0, 0, 1)
    state = load_file(saved)
    assert state["iteration"] == 4 and state["rng_state"][0]["np_rng_state"][0] == "MT19937"
    assert set(state) >= {"optimizer", "opt_param_scheduler", "model"}
    assert load_file(saved.parent / "distrib_optim.pt")

    mindspeed = Path(shutil.copytree(env["mg"], tmp_path / "mindspeed"))
    f = L.rank_file(mindspeed, 1, 0, 0, 1)
    content = torch.load(f, weights_only=False)
    content["args"] = argparse.Namespace(**content["args"], params_dtype=torch.bfloat16,
                                         attention_backend=AttnBackend.auto)
    torch.save(content, f)
    assert rank_args(f)["attention_backend"] is AttnBackend.auto
    assert read_checkpoint_layout(mindspeed).tp == 1


def test_crafted_checkpoint_refused_by_convert_and_train_unless_trusted(env, tmp_path):
    marker = tmp_path / "pwned"
    mg = Path(shutil.copytree(env["mg"], tmp_path / "mg"))
    f = L.rank_file(mg, 1, 0, 0, 1)
    craft(f, marker)
    refused = f"error: {f}: refused to load type {OPENER}"

    line = one_error(cli("convert", "mg2hf", "--mg-dir", mg, "--hf-dir", tmp_path / "hf", "--hf-config-dir",
                         env["model"]))
    assert line.startswith(refused) and "trust_checkpoint" in line, line
    for load_type in (1, 2):
        out = tmp_path / f"type{load_type}"
        cfg = _pipeline_cfg(env, out, ckpt_load_type=load_type, user_converted_ckpt_path=str(mg))
        assert one_error(cli("train", cfg, "tiny", "exp")).startswith(refused)
        assert not (out / "saved_checkpoints").exists()  # refused before any stage
    assert not marker.exists()

    res = cli("convert", "mg2hf", "--mg-dir", mg, "--hf-dir", tmp_path / "hf", "--hf-config-dir", env["model"],
              "--trust-checkpoint")
    assert res.returncode == 0, E.describe(res)
    assert marker.exists() and (tmp_path / "hf" / "config.json").is_file()


def test_crafted_checkpoint_refused_by_auto_resume_unless_trusted(env, tmp_path):
    marker = tmp_path / "pwned"
    out = _copy_run(env, "crafted_resume")
    craft(L.rank_file(out / "saved_checkpoints", 4, 0, 0, 1), marker)
    reseal(out / "saved_checkpoints" / "iter_0000004")
    cfg = _config(out, env["model"], env["data"], train_iters=6)
    res = E.run_engine(cfg, 1)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    want = f"error: {L.rank_file(out / 'saved_checkpoints', 4, 0, 0, 1)}: refused to load type {OPENER}"
    assert len(errors) == 1 and errors[0].startswith(want), E.describe(res)
    assert not marker.exists() and not E.losses(out)

    cfg = _config(out, env["model"], env["data"], train_iters=6, trust_checkpoint=True)
    res = E.run_engine(cfg, 1)
    assert res.returncode == 0, E.describe(res)
    assert marker.exists() and "checkpoint iteration 4; starting at iteration 4" in res.stdout


def test_no_unsafe_load_outside_trust_checkpoint():
    src = Path(E.REPO) / "src"
    lines = [f"{p}:{ln}" for p in src.rglob("*.py") for ln in p.read_text().splitlines()
             if "weights_only=False" in ln or "trust_remote_code=True" in ln]
    assert len(lines) == 1 and "trust_checkpoint" in lines[0], lines


# ---------------------------------------------------------------- damaged checkpoints


def test_same_size_corruption_falls_back_to_previous_checkpoint(env):
    out = _copy_run(env, "corrupt_same_size")
    victim = L.rank_file(out / "saved_checkpoints", 4, 0, 0, 1)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # flip bytes inside the tensor data: torch.load alone would not notice
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert victim.stat().st_size == size
    res = E.run_engine(_config(out, env["model"], env["data"], train_iters=6), 1)
    assert res.returncode == 0, E.describe(res)
    assert f"auto-resume skips {victim.parents[1]}: {victim} content is damaged" in res.stderr, E.describe(res)
    assert "checkpoint iteration 2; starting at iteration 2" in res.stdout
    save = out / "saved_checkpoints"
    assert [p for p in save.iterdir() if p.name.startswith("iter_0000004.replaced-")]  # moved aside, not deleted
    assert L.read_tracker(save) == 6


def test_corrupted_distrib_optim_named(env, tmp_path):
    given = Path(shutil.copytree(env["ref"] / "saved_checkpoints", tmp_path / "given"))
    victim = L.rank_file(given, 4, 0, 0, 1).parent / "distrib_optim.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:  # the zip's central directory at the end, same size
        f.seek(size - 512)
        f.write(b"\0" * 512)
    out = tmp_path / "run"
    cfg = _config(out, env["model"], env["data"], train_iters=6, train_auto_resume=False, ckpt_load_type=2,
                  user_converted_ckpt_path=str(given))
    res = E.run_engine(cfg, 1)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {victim}: unreadable checkpoint file"), \
        E.describe(res)


@pytest.mark.parametrize("tracker", [b"8", b"\x00\xff\xfe\x89PNG\r\n\x1a\n"], ids=["missing", "binary"])
def test_bad_tracker_is_never_complete(env, tracker):
    out = _copy_run(env, f"tracker_{len(tracker)}")
    (out / "saved_checkpoints" / L.TRACKER).write_bytes(tracker)
    # the checkpoints come from an engine run (no run.json): the user claims the folder
    cfg = _pipeline_cfg(env, out, ckpt_load_type=0, train_auto_resume=True, overwrite_output=True)
    res = cli("plan", cfg, "tiny", "exp")
    assert res.returncode == 0 and "Traceback" not in res.stderr, E.describe(res)
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("train ")]
    assert line.startswith("train       run ") and "complete:" not in line, line
    assert f"{out / 'saved_checkpoints' / L.TRACKER}" in line, line

    # train resumes from the newest intact checkpoint (already the last iteration), points the tracker at it and
    # exports it (the export used to fail on the tracker's missing iteration)
    res = cli("train", cfg, "tiny", "exp")
    assert res.returncode == 0, E.describe(res)
    assert "train: running" in res.stdout and "checkpoint iteration 4; starting at iteration 4" in res.stdout
    assert L.read_tracker(out / "saved_checkpoints") == 4
    assert (out / "converted_mg2hf_weight" / "config.json").is_file()
