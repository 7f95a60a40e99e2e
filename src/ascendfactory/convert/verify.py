"""`--verify`: the HF model's logits (fp32, CPU) against megatron-core GPTModels loaded from the
converted checkpoint at its own TP/PP (torchrun, gloo, one process per TP x PP rank)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ascendfactory.errors import UserError
from ascendfactory.launch.lock import die_with_parent

log = logging.getLogger(__name__)

TOLERANCE = 1e-4


class VerificationFailed(UserError):
    """The converted checkpoint does not reproduce the HF model: a loud, non-zero exit."""

    exit_code = 1


def reference_logits(hf_dir, dtype: str | None = None, n_tokens: int = 12, batch: int = 2, seed: int = 0):
    """A few random token ids and the HF model's fp32 logits for them (weights rounded to `dtype` first,
    as the conversion stored them)."""
    import torch
    import transformers

    from ascendfactory.convert import chatglm
    from ascendfactory.convert.options import torch_dtype
    from ascendfactory.modelinfo import is_chatglm_dir

    if is_chatglm_dir(hf_dir):  # its own modeling code is remote code: GLM's with the same weights
        model = chatglm.glm_model(hf_dir)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    if dtype:
        model.to(torch_dtype(dtype)).float()
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (batch, n_tokens), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    return tokens, logits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(jobs: list[dict], nproc: int | None = None, timeout: float = 1800) -> list[dict]:
    """Run the comparison for each job ({"hf_dir", "mg_dir", "iteration"?, "dtype"?: both sides' weights are
    rounded to it}); one result dict per job:
    max_abs_diff and layout. Raises RuntimeError with the worker's log when the launch fails."""
    import torch

    from ascendfactory.ckpt.reader import read_checkpoint_layout, trusting

    layouts = [read_checkpoint_layout(j["mg_dir"], j.get("iteration")) for j in jobs]
    nproc = nproc or max(ck.tp * ck.pp * ck.ep for ck in layouts)
    with tempfile.TemporaryDirectory(prefix="af-verify-") as tmp:
        work = []
        for k, job in enumerate(jobs):
            tokens, logits = reference_logits(job["hf_dir"], job.get("dtype"))
            ref = Path(tmp) / f"ref{k}.pt"
            torch.save({"tokens": tokens, "logits": logits}, ref)
            work.append({**job, "mg_dir": str(job["mg_dir"]), "hf_dir": str(job["hf_dir"]),
                         "reference": str(ref), "result": str(Path(tmp) / f"result{k}.json"),
                         "trust_checkpoint": trusting()})
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(work))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "ascendfactory.convert.verify_worker", str(jobs_file)]
        threads = str(max(1, (os.cpu_count() or 1) // nproc))  # the ranks share the CPU
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        # torchrun stops its workers on SIGTERM: it gets one when this process dies, however it dies.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=functools.partial(die_with_parent, signal.SIGTERM, os.getpid()))
        if proc.returncode != 0:
            raise RuntimeError(f"verify worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return [json.loads(Path(w["result"]).read_text()) for w in work]


def verify_conversion(hf_dir, mg_dir, iteration: int | None = None, dtype: str | None = None,
                      tolerance: float = TOLERANCE) -> float:
    """Compare, print the result, raise VerificationFailed above `tolerance`; returns the max abs difference.
    dtype: the --dtype of the conversion, so that both sides use the same rounded weights."""
    log.info(f"verify: comparing logits of {hf_dir} and {mg_dir}")
    job = {"hf_dir": str(hf_dir), "mg_dir": str(mg_dir), "iteration": iteration, "dtype": dtype}
    (result,) = compare([job])
    diff = result["max_abs_diff"]
    if not diff <= tolerance:  # also catches NaN
        raise VerificationFailed(f"verify: logits of {mg_dir} ({result['layout']}) differ from {hf_dir} by "
                                 f"{diff:.3g} (max abs, tolerance {tolerance:g}); the conversion is wrong")
    log.info(f"verify: OK, max abs logits difference {diff:.3g} ({result['layout']})")
    return diff
