"""`ascendfactory-cli train` end to end on CPU: preprocess -> convert -> train (torchrun, gloo) -> export,
skip-if-done on a re-run, worker restarts, SIGTERM, the run lock."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _engine as E
import pytest

from ascendfactory import tiny
from ascendfactory.launch.lock import RunLock

pytestmark = pytest.mark.slow  # whole-pipeline runs (torchrun): the full suite only

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tiny.make_tiny_model(root / "model", "qwen2", tie_word_embeddings=True)
    tiny.write_instruction_data(root / "data" / "alpaca.jsonl", n=96)
    tiny.write_pretrain_data(root / "data" / "corpus.jsonl", n=96)
    return root


def write_cfg(assets: Path, out: Path, **exp) -> Path:
    base = {"device": "cpu", "nproc_per_node": 2, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 2,
            "global-batch-size": 8, "lr": 2e-3, "min-lr": 2e-4, "train-iters": 8, "save-interval": 4,
            "log_interval": 1, "prompt_type": "qwen", "tensor-model-parallel-size": 1, "train_auto_resume": True,
            "max_restarts": 1}
    return E.write_cli_cfg(assets, out, base, **exp)


def train(cfg: Path, *args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_sft_pipeline_end_to_end_and_rerun_skips(assets, tmp_path):
    out = tmp_path / "sft"
    cfg = write_cfg(assets, out, pack=True, lr_warmup_iters=2)
    r = train(cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("preprocess", "convert", "train", "export"):
        assert f"{stage}: running" in r.stdout and f"{stage}: done" in r.stdout, r.stdout
    assert (out / "exp-config.yaml").is_file()
    assert (out / "converted_hf2mg_weight_TP1PP1" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert (out / "saved_checkpoints" / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # linear warmup over 2 iterations, then cosine from lr 2e-3 down to min_lr 2e-4 at iteration 8
    want = [2e-3 * i / 2 if i <= 2 else 2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 6))
            for i in range(1, 9)]
    assert [m["lr"] for m in metrics(out)] == pytest.approx(want, rel=1e-6)
    assert [m["consumed_samples"] for m in metrics(out)] == [8 * i for i in range(1, 9)]
    log = (out / "logs" / "train_rank_000.log").read_text()
    assert f"from {out / 'converted_hf2mg_weight_TP1PP1'}" in log  # ckpt_load_type 1 loaded the converted weights

    # the export loads in transformers and matches the trained megatron model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ascendfactory.convert.verify import verify_conversion

    export = out / "converted_mg2hf_weight"
    AutoModelForCausalLM.from_pretrained(export)
    assert AutoTokenizer.from_pretrained(export).chat_template
    assert verify_conversion(export, out / "saved_checkpoints") < 1e-4

    # a second run finds every output complete and changes nothing
    ckpt = out / "saved_checkpoints" / "iter_0000008" / "mp_rank_00" / "model_optim_rng.pt"
    mtime = ckpt.stat().st_mtime_ns
    r2 = train(cfg)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for stage in ("preprocess", "convert", "train", "export"):
        assert f"{stage}: skipped" in r2.stdout, r2.stdout
    assert ckpt.stat().st_mtime_ns == mtime


def test_pretrain_random_init_tp2(assets, tmp_path):
    out = tmp_path / "pt"
    # a site's own copy of the stage scripts (scripts_dir) is what launches training
    site = tmp_path / "site_scripts"
    shutil.copytree(ROOT / "scripts_modellink", site)
    train_sh = site / "train.sh"
    train_sh.write_text(train_sh.read_text().replace("set -e\n", "set -e\necho site-launcher > \"$AF_LOG_DIR/site\"\n", 1))
    cfg = write_cfg(assets, out, scripts_dir=str(site), stage="pt", **{"handler-name": "GeneralPretrainHandler"}, ckpt_load_type=0,
                    dataset=str(assets / "data" / "corpus.jsonl"), **{"tensor-model-parallel-size": 2},
                    convert_mg2hf_at_last=False, **{"train-iters": 4},
                    extra_args={"recompute_granularity": "full", "recompute_method": "uniform",
                                "recompute_num_layers": 1, "foo_flag": 1})
    r = train(cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "convert: skipped" in r.stdout and "export: skipped" in r.stdout
    assert (out / "logs" / "site").read_text().strip() == "site-launcher"
    assert not (out / "converted_hf2mg_weight_TP2PP1").exists()
    log = (out / "logs" / "train_rank_000.log").read_text()
    assert "extra_args foo_flag: not megatron-core TransformerConfig fields" in log  # the rest reached the model
    first = metrics(out)[0]["loss"]
    assert abs(first - math.log(450)) < 1.0  # random init: about ln(vocab)
    assert (out / "saved_checkpoints" / "iter_0000004" / "mp_rank_01" / "model_optim_rng.pt").is_file()
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_killed_worker_is_restarted_and_resumes(assets, tmp_path):
    out = tmp_path / "restart"
    cfg = write_cfg(assets, out, pack=True, convert_mg2hf_at_last=False)
    r = train(cfg, env={"ASCENDFACTORY_TEST_KILL_AT": "mid_iteration:6:1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the worker's own line after torchrun restarted it (torchrun's "exitcode: -9" log line is not ours to assert)
    assert "torchrun restart 1: resuming" in r.stdout, r.stdout[-4000:]
    log = (out / "logs" / "train_rank_000.log").read_text()
    assert "iter_0000004" in log  # the restarted workers resumed from the iteration-4 checkpoint
    its = [m["iteration"] for m in metrics(out)]
    assert its[-1] == 8 and its.count(5) == 2  # iterations 5.. were redone after the restart


def test_restarts_exhausted_names_cause_and_log(assets, tmp_path):
    out = tmp_path / "dies"
    cfg = write_cfg(assets, out, pack=True, convert_mg2hf_at_last=False)
    r = train(cfg, env={"ASCENDFACTORY_TEST_KILL_AT": "mid_iteration:6"})
    assert r.returncode not in (0, 2)
    line = [x for x in r.stdout.splitlines() if "train: FAILED" in x][-1]
    assert "killed by SIGKILL after 1 restart(s)" in line and "stderr.log" in line, line
    # the last good checkpoint is intact and is the latest
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_lora_run_exports_merged_model_and_peft_adapter(assets, tmp_path):
    out = tmp_path / "lora"
    cfg = write_cfg(assets, out, pack=True, finetuning_type="lora", lora_r=4, lora_alpha=8, lr=1e-2,
                    **{"train-iters": 4})
    r = train(cfg)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "of LoRA (r 4 on linear_qkv, linear_proj, linear_fc1, linear_fc2)" in r.stdout
    assert f"(merged) and {out / 'lora_adapter'} (PEFT adapter)" in r.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "converted_mg2hf_weight")
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()
    # nothing left to do on a second launch, the adapter included
    r2 = train(cfg)
    assert r2.returncode == 0 and f"{out / 'lora_adapter'} its adapter" in r2.stdout, r2.stdout[-3000:]
    # ... until the adapter folder is gone
    shutil.rmtree(out / "lora_adapter")
    r3 = train(cfg)
    assert r3.returncode == 0 and "export: running" in r3.stdout and (out / "lora_adapter").is_dir()


def test_divergence_fails_the_stage_with_the_workers_reason(assets, tmp_path):
    out = tmp_path / "nan"
    cfg = write_cfg(assets, out, pack=True, convert_mg2hf_at_last=False, lr=1e20, **{"min-lr": 1e20},
                    lr_decay_style="constant", lr_warmup_iters=0, clip_grad=0.0, max_restarts=0,
                    **{"save-interval": 1})
    r = train(cfg)
    assert r.returncode == 1, r.stdout[-3000:]
    line = [x for x in r.stdout.splitlines() if "train: FAILED" in x][-1]
    assert "exited with code 1 (iteration 2: lm loss nan, grad norm nan: training diverged;" in line, line
    assert "stderr.log" in line
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert not (out / "saved_checkpoints" / "iter_0000002").exists()


def test_sigterm_saves_and_next_launch_continues(assets, tmp_path):
    out = tmp_path / "term"
    cfg = write_cfg(assets, out, pack=True, convert_mg2hf_at_last=False, **{"train-iters": 400},
                    **{"save-interval": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = out / "logs" / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # as ModelArts does: the whole process group
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, stdout[-3000:]
    saved = int((out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 400
    r = train(cfg, f"--train-iters={saved + 2}")
    assert r.returncode == 0, r.stdout[-3000:]
    its = [m["iteration"] for m in metrics(out)]
    assert its[-1] == saved + 2 and saved + 1 in its


def test_second_train_on_same_output_dir_is_refused(assets, tmp_path):
    out = tmp_path / "locked"
    cfg = write_cfg(assets, out)
    out.mkdir()
    with RunLock(out):
        r = train(cfg)
    assert r.returncode == 2 and f"in use by pid {os.getpid()}" in r.stderr
    assert not (out / "preprocessed_data").exists()


def _wait_all(procs, timeout: float) -> list[str]:
    """Outputs of all processes; when one fails or time runs out the others are stopped (a node left alone
    would wait for its peer at the rendezvous), so a failure shows every node's log instead of hanging."""
    import threading

    logs = [""] * len(procs)

    def read(i):
        logs[i] = procs[i].stdout.read()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for t in readers:
        t.join(10)
    return logs


def test_two_nodes_sharing_an_output_dir(assets, tmp_path):
    """Two `train` processes as node 0 and node 1 of one job (flags, shared output_dir, 1 device each)."""
    out = tmp_path / "nodes"
    cfg = write_cfg(assets, out, pack=True, nproc_per_node=1, **{"train-iters": 4})
    port = str(E.free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp",
                               "--num_nodes", "2", "--rank", str(r), "--master_addr", "127.0.0.1",
                               f"--master_port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    logs = _wait_all(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "DP2" in (out / "logs" / "train_rank_000.log").read_text()  # one data-parallel group over both nodes
    # node 1 never exports: it skips on this node, or finds node 0's export already complete (whichever is first)
    assert "export: skipped" in logs[1] and "export: running" not in logs[1] and "export: done" in logs[0]
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not list(out.glob(".*partial*")) and not list((out / "preprocessed_data").glob("*.tmp-*"))


def test_two_nodes_restart_together_after_a_worker_dies(assets, tmp_path):
    """Node 0's worker is SIGKILLed after the iteration-2 save: node 1's worker loses its peer and fails, both
    nodes' torchrun restart their workers (attempt 1 on both), which find each other, resume from iteration 2
    and finish the job."""
    out = tmp_path / "nodes_restart"
    cfg = write_cfg(assets, out, pack=True, nproc_per_node=1, **{"train-iters": 6, "save-interval": 2})
    env = {**os.environ, "ASCENDFACTORY_TEST_KILL_AT": "after_save:2:1"}
    port = str(E.free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp",
                               "--num_nodes", "2", "--rank", str(r), "--master_addr", "127.0.0.1",
                               f"--master_port={port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for r in (0, 1)]
    logs = _wait_all(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "torchrun restart 1: resuming from the newest valid checkpoint" in logs[0]
    assert "starting at iteration 2, consumed samples 16" in logs[0]
    assert [m["iteration"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "saved_checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"

