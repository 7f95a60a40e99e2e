"""Helpers for the engine tests: a tiny model, indexed datasets written with megatron-core's builder,
an exp-config.yaml, and `python -m torch.distributed.run -m ascendfactory.engine`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(root: Path, family: str = "qwen2", **overrides) -> Path:
    from ascendfactory.tiny import make_tiny_model

    return make_tiny_model(root / f"model_{family}", family=family, **overrides)


def _builder(prefix: str):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)


def write_pretrain(data_dir: Path, model_dir: Path, docs: int = 200) -> str:
    """`<data_dir>/corpus_text_document.{bin,idx}`: tokenised tiny corpus, EOD after each document."""
    import torch
    from transformers import AutoTokenizer

    from ascendfactory.tiny import corpus_text

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(data_dir / "corpus_text_document")
    b = _builder(prefix)
    for line in corpus_text(docs):
        b.add_item(torch.tensor(tok(line)["input_ids"] + [tok.eos_token_id]))
        b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


def _sft_samples(tok, n: int):
    """(input_ids, labels) pairs: a question with no loss, then an answer with loss."""
    for i in range(n):
        a, b = i % 10, (i * 3) % 10
        prompt = tok(f"what is {a} plus {b}\n")["input_ids"]
        answer = tok(f"{a} plus {b} is {a + b}.")["input_ids"] + [tok.eos_token_id]
        yield prompt + answer, [-100] * len(prompt) + answer


def write_sft(data_dir: Path, model_dir: Path, n: int = 64, pack_len: int | None = None) -> str:
    """`<data_dir>/alpaca_packed_{input_ids,attention_mask,labels}_document`; packed into bins of pack_len."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = str(data_dir / "alpaca")
    parts = {p: _builder(f"{prefix}_packed_{p}_document") for p in ("input_ids", "attention_mask", "labels")}
    rows = []
    samples = list(_sft_samples(tok, n))
    if pack_len is None:
        for ids, lab in samples:
            rows.append((ids, [1] * len(ids), lab))
    else:
        cur = ([], [], [])
        for ids, lab in samples:
            if len(cur[0]) + len(ids) > pack_len:
                rows.append(cur)
                cur = ([], [], [])
            k = max(cur[1], default=0) + 1
            cur = (cur[0] + ids, cur[1] + [k] * len(ids), cur[2] + lab)
        rows.append(cur)
        pad = pack_len
        rows = [(i + [0] * (pad - len(i)), m + [0] * (pad - len(m)), lab + [-100] * (pad - len(lab)))
                for i, m, lab in rows]
    for ids, mask, lab in rows:
        for p, v in zip(("input_ids", "attention_mask", "labels"), (ids, mask, lab)):
            parts[p].add_item(torch.tensor(v))
            parts[p].end_document()
    for p, b in parts.items():
        b.finalize(f"{prefix}_packed_{p}_document.idx")
    return prefix


def write_config(out: Path, model_dir: Path, data_dir: Path, **kw) -> Path:
    cfg = dict(
        model_name_or_path=str(model_dir), output_dir=str(out), processed_data_dir=str(data_dir),
        stage="sft", ckpt_load_type=0, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        micro_batch_size=2, global_batch_size=4, seq_len=64, max_pe=256, train_iters=6, lr=3e-3, min_lr=3e-4,
        lr_warmup_iters=1, save_interval=1000, log_interval=1, seed=1234, device="cpu",
        use_distributed_optimizer=False, clip_grad=1.0, weight_decay=0.0,
    )
    cfg.update(kw)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "exp-config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_cli_cfg(assets: Path, out: Path, base: dict, **exp) -> Path:
    """A cfgs.yaml for `ascendfactory-cli train <it> tiny exp`: the tiny model and alpaca data of the e2e assets."""
    cfg = {"base": base, "tiny": {"model_name_or_path": str(assets / "model"),
                                  "dataset": str(assets / "data" / "alpaca.jsonl"), "output_dir": str(out),
                                  "exp": exp}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def plan_error(config: Path, nproc: int, command: str = "plan", **kw) -> str | None:
    """`ascendfactory-cli plan` (or `train`, expected to refuse) of an engine run's own config (kw: other settings)
    as its relaunch with train_auto_resume: its one error line (exit 2), or None when the plan passes (exit 0).
    overwrite_output: the engine run, started by torchrun directly, left no record of an ascendfactory run in its
    output_dir."""
    cfgs = config.parent.parent / f"{config.parent.name}-relaunch.yaml"
    exp = {**yaml.safe_load(config.read_text()), "train_auto_resume": True, "nproc_per_node": nproc,
           "overwrite_output": True, **kw}
    cfgs.write_text(yaml.safe_dump({"m": {"e": exp}}))
    res = subprocess.run([sys.executable, "-m", "ascendfactory", command, str(cfgs), "m", "e"], capture_output=True,
                         text=True, env=engine_env(), timeout=120)
    assert res.returncode in (0, 2), res.stdout + res.stderr
    errors = [ln.removeprefix("error: ") for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == (res.returncode == 2), res.stdout + res.stderr
    return errors[0] if errors else None


def engine_cmd(config: Path, nproc: int, *torchrun_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *torchrun_args, "-m", "ascendfactory.engine", "--config", str(config)]


def engine_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_engine(config: Path, nproc: int = 1, timeout: int = 240, torchrun_args: tuple = (),
               **env) -> subprocess.CompletedProcess:
    """Run to completion in its own session; on timeout the whole group goes (workers stuck in a collective
    would otherwise outlive torchrun and load the machine for the rest of the suite)."""
    proc = subprocess.Popen(engine_cmd(config, nproc, *torchrun_args), env=engine_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def resume_copy(out: Path, config: Path, model_dir: Path, data_dir: Path, again: Path, nproc: int, drop: int,
                back_to: int, **kw) -> subprocess.CompletedProcess:
    """A copy of a run's output folder in `again` without its checkpoint `drop`, the tracker back at `back_to` and
    no metrics yet, auto-resumed with the run's settings (kw: others)."""
    import shutil

    from ascendfactory.ckpt import files as L

    shutil.copytree(out, again)
    shutil.rmtree(again / "saved_checkpoints" / L.iter_dir_name(drop))
    L.write_tracker(again / "saved_checkpoints", back_to)
    (again / "logs" / "metrics.jsonl").unlink()
    settings = {**yaml.safe_load(config.read_text()), "output_dir": str(again), "train_auto_resume": True, **kw}
    return run_engine(write_config(again, model_dir, data_dir, **settings), nproc, timeout=600)


def start_engine(config: Path, nproc: int = 1, **env) -> subprocess.Popen:
    return subprocess.Popen(engine_cmd(config, nproc), env=engine_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def metrics(out: Path) -> list[dict]:
    """Rows of metrics.jsonl; a line cut short by a kill is skipped."""
    p = out / "logs" / "metrics.jsonl"
    rows = []
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def losses(out: Path) -> dict[int, float]:
    """iteration -> loss; the last record wins (a resumed run re-logs the iterations it repeats)."""
    from ascendfactory.engine.metrics import read_losses

    return read_losses(out / "logs" / "metrics.jsonl")


def final_weights(out: Path, iteration: int | None = None) -> dict:
    """All mp_rank files' model tensors of the given (default: tracker) iteration, keyed by rank dir + name."""
    import torch

    from ascendfactory.ckpt import files as L

    save = out / "saved_checkpoints"
    it = iteration if iteration is not None else L.read_tracker(save)
    res = {}
    for f in sorted((save / L.iter_dir_name(it)).glob("mp_rank_*/model_optim_rng.pt")):
        for k, v in torch.load(f, map_location="cpu", weights_only=False)["model"].items():
            if hasattr(v, "dtype"):
                res[f"{f.parent.name}/{k}"] = v.float()
    return res


def describe(res) -> str:
    return f"rc={res.returncode}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-6000:]}"
