"""Fault tolerance of the engine (issue 6): runs killed with SIGKILL at fixed points and at a seeded random
moment resume exactly; SIGTERM saves and exits; a damaged newest checkpoint is skipped; a save that the disk
refuses stops the run with the previous checkpoint intact. DP2 with the distributed optimizer throughout."""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import _engine as E
import pytest

from ascendfactory.ckpt import files as L

pytestmark = pytest.mark.slow

ITERS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_faults")
    model = E.make_model(root)
    data = root / "sft"
    E.write_sft(data, model)
    ref = root / "reference"
    res = E.run_engine(_config(ref, model, data), 2)
    assert res.returncode == 0, E.describe(res)
    return {"root": root, "model": model, "data": data, "ref": ref, "ref_losses": E.losses(ref),
            "ref_weights": E.final_weights(ref)}


def _config(out, model, data, **kw):
    base = dict(train_iters=ITERS, save_interval=2, train_auto_resume=True, use_distributed_optimizer=True,
                global_batch_size=4, micro_batch_size=1)
    base.update(kw)
    return E.write_config(out, model, data, **base)


def _assert_same_as_reference(env, out):
    losses = E.losses(out)
    ref = env["ref_losses"]
    assert sorted(losses) == sorted(ref) == list(range(1, ITERS + 1))
    for it in ref:
        assert abs(losses[it] - ref[it]) <= 1e-6 * abs(ref[it]), (it, losses[it], ref[it])
    weights = E.final_weights(out)
    assert weights.keys() == env["ref_weights"].keys()
    worst = max((weights[k] - env["ref_weights"][k]).abs().max().item() for k in weights)
    assert worst <= 1e-6


def _resume(env, out):
    res = E.run_engine(_config(out, env["model"], env["data"]), 2)
    assert res.returncode == 0, E.describe(res)
    return res


@pytest.mark.parametrize("point", ["after_save:4", "mid_iteration:5", "save_files:6"])
def test_sigkill_at_fixed_point_resumes_exactly(env, point):
    out = env["root"] / f"kill_{point.replace(':', '_')}"
    res = E.run_engine(_config(out, env["model"], env["data"]), 2, ASCENDFACTORY_TEST_KILL_AT=point)
    assert res.returncode != 0, E.describe(res)
    save = out / "saved_checkpoints"
    expected_latest = {"after_save:4": 4, "mid_iteration:5": 4, "save_files:6": 4}[point]
    assert L.read_tracker(save) == expected_latest
    if point == "save_files:6":
        # The half-written checkpoint exists only under its temporary name, never as iter_0000006.
        assert (save / ".tmp_iter_0000006").is_dir() and not (save / "iter_0000006").exists()
    res = _resume(env, out)
    assert f"checkpoint iteration {expected_latest}; starting at iteration {expected_latest}" in res.stdout
    _assert_same_as_reference(env, out)
    assert not (save / ".tmp_iter_0000006").exists()


RESTART_SCRIPT = """
import os, signal, sys, time
import torch, torch.distributed as dist
from ascendfactory.engine.trainer import init_distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 0:
    time.sleep(3)  # rank 1 reaches the store first and must wait for rank 0's new address
init_distributed("gloo")
t = torch.ones(1)
dist.all_reduce(t)
if attempt == 0:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:  # own file: the ranks share torchrun's stdout
    f.write(f"attempt {attempt} sum {t.item()}")
dist.destroy_process_group()  # as the trainer does: gloo's threads are joined before the interpreter exits
"""


def test_restarted_ranks_never_dial_the_dead_attempts_addresses(tmp_path):
    """torchrun's static rendezvous keeps one store across restarts: without per-attempt keys a restarted rank
    that starts first reads the address the killed rank published and fails with Connection refused."""
    script = tmp_path / "restart.py"
    script.write_text(RESTART_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(E.free_port()), "--max-restarts", "1", str(script), str(tmp_path)]
    res = subprocess.run(cmd, env=E.engine_env(), capture_output=True, text=True, timeout=120,
                         start_new_session=True)
    assert res.returncode == 0, E.describe(res)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["attempt 1 sum 2.0"] * 2


def test_torchrun_restart_resumes_without_train_auto_resume(env):
    """A worker killed after the iteration-4 save; torchrun restarts the workers, which resume from it."""
    out = env["root"] / "restart"
    cfg = _config(out, env["model"], env["data"], train_auto_resume=False, ckpt_load_type=0)
    res = E.run_engine(cfg, 2, torchrun_args=("--max-restarts", "1"), ASCENDFACTORY_TEST_KILL_AT="after_save:4")
    assert res.returncode == 0, E.describe(res)
    assert "torchrun restart 1: resuming" in res.stdout
    assert "checkpoint iteration 4; starting at iteration 4" in res.stdout
    _assert_same_as_reference(env, out)


def test_sigkill_at_seeded_random_moment_resumes_exactly(env):
    rng = random.Random(20261128)
    # Some moment after iteration `after` was logged: inside the next iteration, its save, or the logging.
    victim, after, delay = rng.choice([0, 1]), rng.randint(1, ITERS - 2), rng.uniform(0.0, 0.02)
    out = env["root"] / "kill_random"
    proc = E.start_engine(_config(out, env["model"], env["data"]), 2)
    try:
        deadline = time.monotonic() + 120
        while max(E.losses(out), default=0) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        pids = _worker_pids(proc.pid)
        if len(pids) == 2:
            os.kill(pids[victim], signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        E.kill_group(proc)
    killed_at = max(E.losses(out), default=0)
    assert killed_at < ITERS, "the run finished before the kill; lower the delay"
    _resume(env, out)
    _assert_same_as_reference(env, out)


def _worker_pids(torchrun_pid: int) -> list[int]:
    """torchrun's children sorted by pid (= local rank order: workers start in rank order)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(torchrun_pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_sigterm_saves_within_grace_and_exits_3(env):
    out = env["root"] / "sigterm"
    cfg = _config(out, env["model"], env["data"], train_iters=60, save_interval=1000)
    proc = E.start_engine(cfg, 2)
    try:
        deadline = time.monotonic() + 120
        while len(E.metrics(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # like ModelArts: to the launcher, which forwards it to the workers
        proc.communicate(timeout=60)
    finally:
        E.kill_group(proc)
    stopped = max(E.losses(out))
    assert 2 <= stopped < 60
    save = out / "saved_checkpoints"
    assert L.read_tracker(save) == stopped
    log0 = (out / "logs" / "train_rank_000.log").read_text()
    assert "stop requested (SIGTERM)" in log0 and "exiting with code 3" in log0
    res = E.run_engine(cfg, 2)
    assert res.returncode == 0, E.describe(res)
    assert f"starting at iteration {stopped}, consumed samples {stopped * 4}" in res.stdout
    assert sorted(E.losses(out)) == list(range(1, 61))


def test_damaged_newest_checkpoint_is_skipped_and_kept(env):
    out = env["root"] / "damaged"
    shutil.copytree(env["ref"] / "saved_checkpoints", out / "saved_checkpoints")
    shutil.copytree(env["ref"] / "logs", out / "logs")
    victim = out / "saved_checkpoints" / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    res = _resume(env, out)
    assert "auto-resume skips" in res.stderr and "iter_0000008" in res.stderr and "manifest says" in res.stderr
    assert "checkpoint iteration 6; starting at iteration 6" in res.stdout
    _assert_same_as_reference(env, out)
    save = out / "saved_checkpoints"
    assert [p for p in save.iterdir() if p.name.startswith("iter_0000008.replaced-")]  # kept for a person
    assert all((save / L.iter_dir_name(i)).is_dir() for i in (2, 4, 6, 8))


def _limit_file_size():
    # Writes past 64 KiB fail with EFBIG (Python ignores SIGXFSZ): a full disk, as seen by the writer.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_disk_full_during_save_keeps_previous_checkpoint(env):
    out = env["root"] / "diskfull"
    shutil.copytree(env["ref"] / "saved_checkpoints", out / "saved_checkpoints")
    cfg = _config(out, env["model"], env["data"], train_iters=10)
    res = subprocess.run(E.engine_cmd(cfg, 2), env=E.engine_env(), capture_output=True, text=True, timeout=240,
                         preexec_fn=_limit_file_size)
    assert res.returncode != 0
    assert "error: cannot write checkpoint iteration 10" in res.stderr
    assert "previous checkpoint iter_0000008 is intact" in res.stderr
    save = out / "saved_checkpoints"
    assert L.read_tracker(save) == 8 and not (save / "iter_0000010").exists()
    assert not list(save.glob(".tmp_*"))
    from ascendfactory.engine.checkpoint import newest_valid

    assert newest_valid(save) == 8


def _without_root_override() -> list[str]:
    """As root, permissions only bind once CAP_DAC_OVERRIDE is gone: run under setpriv without it."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder cannot be made binding")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_read_only_save_dir_refused_before_training(env):
    out = env["root"] / "readonly"
    shutil.copytree(env["ref"] / "saved_checkpoints", out / "saved_checkpoints")
    (out / "logs").mkdir()
    save = out / "saved_checkpoints"
    cfg = _config(out, env["model"], env["data"], train_iters=10)
    prefix = _without_root_override()
    save.chmod(0o555)
    try:
        res = subprocess.run(prefix + E.engine_cmd(cfg, 2), env=E.engine_env(), capture_output=True, text=True,
                             timeout=240)
    finally:
        save.chmod(0o755)
    assert res.returncode != 0
    assert f"error: {save}: not writable" in res.stderr
    assert L.read_tracker(save) == 8 and not E.losses(out)


def test_diverged_training_stops_before_saving_non_finite_weights(env, tmp_path):
    """lr 1e20: iteration 1 is finite (and saved), its update overflows the weights, iteration 2's loss is NaN:
    every rank stops with one `error:` line, exit 1, and neither NaN weights nor a tracker pointing at them."""
    out = tmp_path / "diverged"
    cfg = _config(out, env["model"], env["data"], save_interval=1, lr=1e20, min_lr=1e20, lr_decay_style="constant",
                  lr_warmup_iters=0, clip_grad=0.0)
    res = E.run_engine(cfg, 2)
    assert res.returncode != 0 and re.search(r"exitcode\s*: 1 ", res.stderr), E.describe(res)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: iteration 2: lm loss nan, grad norm nan: training diverged; "
                                           "nothing of this iteration was saved and the newest checkpoint, "
                                           f"{out / 'saved_checkpoints' / 'iter_0000001'}, is from before"), errors
    assert "trainer.py" not in res.stderr  # no worker traceback (torchrun prints its own)
    assert L.read_tracker(out / "saved_checkpoints") == 1
    assert L.iterations_on_disk(out / "saved_checkpoints") == [1]
    assert [m["iteration"] for m in E.metrics(out)][-1] == 2  # the NaN iteration is logged, for the record
