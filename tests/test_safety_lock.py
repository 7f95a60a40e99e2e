"""The run lock and the lifetime of a run's processes (issue 10), a worker's bad input (issue 11): real `train`
runs (torchrun, gloo workers on CPU) and real processes killed with real signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _engine as E
import pytest

from ascendfactory import tiny
from ascendfactory.launch.lock import RunLock, lock_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tiny.make_tiny_model(root / "model", "qwen2", tie_word_embeddings=True)
    tiny.write_instruction_data(root / "data" / "alpaca.jsonl", n=64)
    return root


def write_cfg(assets: Path, out: Path, **exp) -> Path:
    # Random init and no export: only preprocess and train run.
    base = {"device": "cpu", "nproc_per_node": 2, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 2,
            "global-batch-size": 4, "train-iters": 400, "save-interval": 1000, "log_interval": 1,
            "prompt_type": "qwen", "tensor-model-parallel-size": 1, "ckpt_load_type": 0,
            "convert_mg2hf_at_last": False, "train_auto_resume": True, "max_restarts": 2}
    return E.write_cli_cfg(assets, out, base, **exp)


def train_cmd(cfg: Path) -> list[str]:
    # A free port of its own: the default one may be taken by a concurrent run between check and bind.
    return [sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp", f"--master_port={E.free_port()}"]


def train(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=600)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def lock_holders(path: Path) -> set[int]:
    """The pids that took a flock on `path`, from the kernel's /proc/locks."""
    ino = os.stat(path).st_ino
    return {int(f[4]) for f in (line.split() for line in Path("/proc/locks").read_text().splitlines())
            if f[1] == "FLOCK" and int(f[5].rsplit(":", 1)[1]) == ino}


def pending_signals(pid: int) -> int:
    """The process-wide pending signals of a (stopped) process, as a bit mask (bit n-1: signal n)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("ShdPnd:")).split()[1], 16)


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("text, expected", [
    ("", "the lock file is empty"),
    (json.dumps({"host": socket.gethostname(), "pid": "12x"}), "does not name a host and a process id"),
    ('{"host": "other-node", "pid": 4242, "started": "2026-01-01T00:00:00"}',
     "locked by pid 4242 on host other-node (since 2026-01-01T00:00:00)"),
])
def test_lock_file_naming_no_live_run_here_is_refused_with_the_command_that_clears_it(assets, tmp_path, text,
                                                                                     expected):
    out = tmp_path / "out"
    out.mkdir()
    lock = lock_path(out)
    lock.write_text(text)
    r = train(write_cfg(assets, out))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert expected in r.stderr and r.stderr.strip().endswith(f"clear it with: rm {lock}"), r.stderr
    assert lock.read_text() == text and not (out / "preprocessed_data").exists()


def test_killed_cli_keeps_the_output_dir_locked_until_its_torchrun_and_workers_are_gone(assets, tmp_path):
    """`train` SIGKILLed mid-training: its torchrun gets SIGTERM (PR_SET_PDEATHSIG), and torchrun and every
    worker hold the lock themselves, so a second `train` is refused until they have saved and exited."""
    out = tmp_path / "killed"
    cfg = write_cfg(assets, out)
    with open(tmp_path / "cli.log", "w") as log:
        cli = subprocess.Popen(train_cmd(cfg), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pids = []
    try:
        wait_for(lambda: len(E.metrics(out)) >= 2 or cli.poll() is not None, 300, "training")
        assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
        (agent,) = children(cli.pid)  # train.sh execs torchrun
        workers = children(agent)
        pids = [agent, *workers]
        assert len(workers) == 2
        # Stopped, torchrun cannot act on the SIGTERM yet: the workers go on training while we look.
        os.kill(agent, signal.SIGSTOP)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        wait_for(lambda: pending_signals(agent) & (1 << (signal.SIGTERM - 1)), 10, "SIGTERM to torchrun")
        assert {agent, *workers} <= lock_holders(lock_path(out))

        r = train(cfg)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"in use by pid {cli.pid} on host {socket.gethostname()}" in r.stderr, r.stderr
        assert "its torchrun and workers are still stopping" in r.stderr and "Traceback" not in r.stderr
        assert "preprocess" not in r.stdout and all(running(p) for p in workers)

        os.kill(agent, signal.SIGCONT)  # torchrun forwards the SIGTERM: the workers save and exit 3
        wait_for(lambda: not any(running(p) for p in pids), 180, f"torchrun and workers {pids} to exit")
    finally:
        kill_all(pids)
    log0 = (out / "logs" / "train_rank_000.log").read_text()
    assert "stop requested (SIGTERM)" in log0 and "exiting with code 3" in log0
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").is_file()
    with RunLock(out) as lock:  # free again: nothing of the killed run is left
        assert lock.held


def test_workers_save_and_exit_when_their_torchrun_is_killed(tmp_path):
    model = E.make_model(tmp_path)
    data = tmp_path / "sft"
    E.write_sft(data, model)
    out = tmp_path / "out"
    cfg = E.write_config(out, model, data, train_iters=400)
    torchrun = subprocess.Popen(E.engine_cmd(cfg, 2), env=E.engine_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        wait_for(lambda: E.metrics(out) or torchrun.poll() is not None, 300, "training")
        workers = children(torchrun.pid)
        assert torchrun.poll() is None and len(workers) == 2
        torchrun.kill()
        torchrun.wait()
        wait_for(lambda: not any(running(p) for p in workers), 120, f"workers {workers} to exit")
    finally:
        kill_all([torchrun.pid, *workers])
    log0 = (out / "logs" / "train_rank_000.log").read_text()
    assert "stop requested (SIGTERM)" in log0 and "exiting with code 3" in log0
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").is_file()


def test_worker_bad_input_is_not_restarted_and_reported_once(assets, tmp_path):
    """A user error only a worker sees (saved_checkpoints cannot be created: a file is in the way): exit 2 in
    the first attempt, no restart although max_restarts is 2, and one FAILED line with the worker's reason."""
    out = tmp_path / "bad"
    # overwrite_output: the file is the user's own doing in a folder they hand over (else refused before launch)
    cfg = write_cfg(assets, out, **{"train-iters": 4, "overwrite_output": True})
    out.mkdir()
    (out / "saved_checkpoints").write_text("not a folder")
    r = train(cfg)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert [p.name for p in (out / "logs" / "torchrun").glob("*/attempt_*")] == ["attempt_0"]
    failed = [line for line in r.stdout.splitlines() if "train: FAILED" in line]
    assert len(failed) == 1, r.stdout[-3000:]
    record = json.loads((out / "logs" / "torchrun" / "error-node0.json").read_text())["message"]
    rank = record["extraInfo"]["local_rank"]  # both ranks refuse; torchrun names the first
    assert record["errorCode"] == 2 and rank in (0, 1)
    assert (f"local rank {rank} stopped on bad input ({out / 'saved_checkpoints'}: not writable (File exists);"
            in failed[0]), failed[0]
    assert "restart" not in failed[0] and f"attempt_0/{rank}/stderr.log" in failed[0], failed[0]
