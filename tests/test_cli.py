"""The command surface: --help speed and imports, list, exit codes, the run lock."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ascendfactory.errors import UserError
from ascendfactory.launch.lock import RunLock, lock_path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "modellink_performance_cfgs.yaml"


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "ascendfactory", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t = time.perf_counter(); from ascendfactory.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'megatron', 'transformers', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith("HEAVY []"), line
    # wall time of the whole command, interpreter start included
    t = time.perf_counter()
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "plan" in r.stdout
    print("help wall", time.perf_counter() - t)


def test_console_script_and_module_agree():
    exe = Path(sys.executable).parent / "ascendfactory-cli"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(exe), "list", str(SHIPPED)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == cli("list", SHIPPED).stdout


def test_list_shipped_config():
    r = cli("list", SHIPPED)
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for model in ("qwen2-0.5b", "qwen2-7b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-72b", "llama3.1-8b",
                  "llama3.1-70b", "llama3.2-1b", "qwen3-8b"):
        assert model in lines
    assert "  4096-sft-full" in lines and "  8192-sft-full" in lines and "  4096-pt-full" in lines


def test_user_error_exit_2_one_line_no_traceback(tmp_path):
    r = cli("list", tmp_path / "missing.yaml")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.yaml" in r.stderr and "Traceback" not in r.stderr
    r = cli("--debug", "list", tmp_path / "missing.yaml")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_unknown_model_exit_2(tmp_path):
    r = cli("plan", SHIPPED, "qwen2-7", "4096-sft-full")
    assert r.returncode == 2 and "did you mean `qwen2-7b`" in r.stderr and "Traceback" not in r.stderr


def test_lock_refuses_second_holder_and_takes_over_stale(tmp_path):
    with RunLock(tmp_path):
        assert lock_path(tmp_path).exists()
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not lock_path(tmp_path).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(tmp_path).write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
    with RunLock(tmp_path) as lock:
        assert lock.held and str(os.getpid()) in lock_path(tmp_path).read_text()


def test_lock_of_other_host_is_respected(tmp_path):
    lock_path(tmp_path).write_text('{"host": "other-node", "pid": 1}')
    with pytest.raises(UserError, match="other-node"):
        RunLock(tmp_path).acquire()
    assert "other-node" in lock_path(tmp_path).read_text()  # not deleted
