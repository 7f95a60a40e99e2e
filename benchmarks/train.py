"""Training throughput and launch overhead, in one run.

1. Throughput: our engine (`torchrun --nproc_per_node 1 -m ascendfactory.engine`: megatron-core GPTModel, DDP, Adam,
   OptimizerParamScheduler, gloo) vs a plain loop (transformers Qwen2ForCausalLM with SDPA + torch AdamW +
   clip_grad_norm_, in its own process), same model weights, same token stream, same batch shape, runs interleaved.
   Tokens/s by wall time and by CPU time (the process's CPU seconds of each training step, the engine's measured in
   its worker around Trainer._train_step: far less sensitive to other jobs on a shared machine than wall time),
   median over the iterations after `--warmup`, then over the repeats.
2. Launch overhead: `ascendfactory-cli train configs/demo.yaml qwen2-tiny sft-demo` (the README's demo) on a warm
   machine: a first run preprocesses the data and converts the weights (2 iterations), then each timed run is the same
   command in the same output_dir with its saved_checkpoints removed (so preprocess and convert are skipped as
   complete and training starts at iteration 0 from the converted weights), plus --log_interval=1 so that iteration 1
   is logged. Command start -> start of iteration 1 (its log line's arrival minus its elapsed time), split at the
   "train: running" line and the first worker line; next to it the import time of torch + megatron-core in a fresh
   interpreter (`python -c "import torch, megatron.core"`), and the CPU seconds of the critical path up to iteration 1
   (`train`'s own process + torchrun + the slower worker). Each timed run is stopped with SIGTERM after iteration 1.

    python benchmarks/train.py [--hidden 768] [--layers 8] [--seq 512] [--gbs 2] [--iters 8] [--threads 2]
                               [--repeats 3] [--launch-repeats 3] [--skip-throughput] [--skip-launch]
    python benchmarks/train.py --device cuda [--peak-tflops 989]

CPU: a Qwen2-shaped fp32 model with ~50M weights (hidden 768, 8 layers, 12 heads / 2 KV heads, FFN 2112, the tiny
tokenizer's vocabulary). cuda: a random-init Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads / 2 KV heads,
FFN 4864, vocabulary 151,936, tied embeddings) in bf16 (the plain loop: fp32 weights under bf16 autocast, fused
AdamW), reporting MFU = model TFLOP/s / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import _engine as E  # noqa: E402  (tiny model, indexed data and config helpers shared with the tests)


def engine_run(cfg: Path, threads: int, warmup: int) -> dict:
    """Median tokens/s after warm-up, by wall time (metrics.jsonl) and by CPU time per training step (the worker's
    process_time around each Trainer._train_step, the span the plain loop times too)."""
    cpu_file = Path(cfg).parent / "step_cpu_seconds.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(E.free_port()),
           __file__, "--engine-worker", str(cpu_file), str(cfg)]
    res = subprocess.run(cmd, env=E.engine_env(OMP_NUM_THREADS=threads), capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"engine run failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    rows = E.metrics(Path(cfg).parent)
    tokens = rows[0]["tokens_per_sec"] * rows[0]["iter_ms"] / 1000  # per iteration
    cpu = json.loads(cpu_file.read_text())
    return {"wall": statistics.median(r["tokens_per_sec"] for r in rows[warmup:]),
            "cpu": tokens / statistics.median(cpu[warmup:])}


def engine_worker(cpu_file: str, cfg: str) -> None:
    """`python -m ascendfactory.engine --config cfg` as torchrun starts it, recording each step's CPU seconds."""
    import atexit
    import runpy

    from ascendfactory.engine.trainer import Trainer

    step, cpu = Trainer._train_step, []

    def timed(self):
        c0 = time.process_time()
        out = step(self)
        cpu.append(time.process_time() - c0)
        return out

    Trainer._train_step = timed
    atexit.register(lambda: Path(cpu_file).write_text(json.dumps(cpu)))
    sys.argv = ["ascendfactory.engine", "--config", cfg]
    runpy.run_module("ascendfactory.engine", run_name="__main__", alter_sys=True)


def plain_loop(model_dir: str, prefix: str, seq: int, gbs: int, iters: int, warmup: int, threads: int, lr: float,
               device: str) -> dict:
    """tokens/s of transformers + torch.optim.AdamW on the same token stream (median after warm-up)."""
    import contextlib

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.train()
    gpu = device != "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=gpu)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    per_batch = gbs * (seq + 1)
    wall, cpu = [], []
    for it in range(iters):
        start = (it * per_batch) % (len(tokens) - per_batch)
        chunk = torch.from_numpy(tokens[start:start + per_batch]).view(gbs, seq + 1).to(device)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        wall.append(gbs * seq / (time.perf_counter() - t0))
        cpu.append(gbs * seq / (time.process_time() - c0))
    return {"wall": statistics.median(wall[warmup:]), "cpu": statistics.median(cpu[warmup:])}


def plain_run(*args) -> dict:
    """plain_loop in a fresh process, as the engine's worker is (nothing imported or warmed by this one)."""
    out = subprocess.run([sys.executable, __file__, "--plain-worker", json.dumps(args)], env=E.engine_env(),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# Dense bf16 peak TFLOP/s (no sparsity) by device name; --peak-tflops for others.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "4090": 165.2}


def peak_tflops(given: float | None) -> float:
    import torch

    if given:
        return given
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)")


def throughput(a: argparse.Namespace) -> dict:
    gpu = a.device == "cuda"
    # cuda: Qwen2-0.5B's shape; cpu: ~50M weights, enough that the per-step overhead is not everything.
    hidden = a.hidden or (896 if gpu else 768)
    shape = (dict(hidden_size=hidden, intermediate_size=hidden * 38 // 7, num_hidden_layers=a.layers or 24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
             if gpu else
             dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=a.layers or 8,
                  num_attention_heads=hidden // 64, num_key_value_heads=2))
    seq, gbs = a.seq or (2048 if gpu else 512), a.gbs or (8 if gpu else 2)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = E.make_model(root, max_position_embeddings=max(seq, 256), **shape)
        prefix = E.write_pretrain(root / "data", model, docs=8000 if gpu else 3000)
        for r in range(a.repeats):  # interleaved: the machine's load moves both alike
            cfg = E.write_config(root / f"run{r}", model, root / "data", stage="pt", seq_len=seq, max_pe=max(seq, 256),
                                 global_batch_size=gbs, micro_batch_size=gbs, train_iters=a.iters,
                                 save_interval=10**6, lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, device=a.device,
                                 precision="bf16" if gpu else "fp32")
            ours.append(engine_run(cfg, a.threads, a.warmup))
            plain.append(plain_run(str(model), prefix, seq, gbs, a.iters, a.warmup, a.threads, 1e-4, a.device))
            print(f"repeat {r + 1}: engine {ours[-1]['wall']:.0f} / plain {plain[-1]['wall']:.0f} tokens/s (wall), "
                  f"engine {ours[-1]['cpu']:.0f} / plain {plain[-1]['cpu']:.0f} tokens/CPU-s; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
        from ascendfactory.engine.metrics import flops_per_token
        from ascendfactory.modelinfo import read_model_facts

        facts = read_model_facts(str(model))
        tflop_per_token = flops_per_token(facts, seq) / 1e12
    weights = facts.num_layers * (2 * hidden * hidden + 2 * hidden * facts.num_kv_heads * facts.head_dim
                                  + 3 * hidden * facts.ffn_hidden_size) + facts.vocab_size * hidden
    med = {k: {w: statistics.median(x[w] for x in runs) for w in ("wall", "cpu")}
           for k, runs in (("engine", ours), ("plain", plain))}
    result = {
        "model": f"qwen2-shaped hidden {hidden}, {shape['num_hidden_layers']} layers, ~{weights / 1e6:.0f}M weights, "
                 f"{'bf16' if gpu else 'fp32'}, {a.device}",
        "seq_len": seq, "gbs": gbs, "threads": a.threads, "iters": a.iters, "warmup": a.warmup,
        "repeats": a.repeats,
        "engine_tokens_per_s": [round(x["wall"], 1) for x in ours],
        "plain_tokens_per_s": [round(x["wall"], 1) for x in plain],
        "engine_tokens_per_cpu_s": [round(x["cpu"], 1) for x in ours],
        "plain_tokens_per_cpu_s": [round(x["cpu"], 1) for x in plain],
        "ratio_wall": round(med["engine"]["wall"] / med["plain"]["wall"], 3),
        "ratio_cpu": round(med["engine"]["cpu"] / med["plain"]["cpu"], 3),
    }
    if gpu:
        peak = peak_tflops(a.peak_tflops)
        result.update(peak_tflops=peak, engine_mfu=round(med["engine"]["wall"] * tflop_per_token / peak, 4),
                      plain_mfu=round(med["plain"]["wall"] * tflop_per_token / peak, 4))
    return result


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process, all its threads (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _tree_cpu(pid: int) -> dict:
    """CPU seconds so far of `train` itself, torchrun (its child) and the workers (torchrun's children): on 2 cores
    far less sensitive to other jobs than wall time."""
    agents = _children(pid)
    workers = [w for a in agents for w in _children(a)]
    return {"train": _cpu_seconds(pid), "torchrun": sum(map(_cpu_seconds, agents)),
            "workers": [_cpu_seconds(w) for w in workers]}


def _timed(cmd: list[str], cwd: Path, stop_at: str | None = None) -> dict:
    """Run `cmd`; the seconds (from its start) at which each marker line arrived. With stop_at, SIGTERM once a line
    matching it arrives (the run saves and stops), then wait for the whole run to end."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, lines = {}, []
    for line in proc.stdout:
        now = time.monotonic() - t0
        lines.append(line)
        if "train: running" in line:
            seen.setdefault("train_running", now)
        elif "[default" in line:
            seen.setdefault("first_worker_line", now)
        if " validation loss at iteration 0 " in line:
            seen.setdefault("validation_0_done", now)
        if m := re.search(r"iteration +1/.*elapsed time per iteration \(ms\): ([\d.]+)", line):
            seen["iteration_1_start"] = now - float(m.group(1)) / 1000
            seen["iteration_1_logged"] = now
            seen["cpu_at_iteration_1"] = _tree_cpu(proc.pid)
            if stop_at:
                proc.send_signal(signal.SIGTERM)
    rc = proc.wait()
    if stop_at is None and rc != 0 or stop_at and "iteration_1_start" not in seen:
        raise SystemExit(f"demo run failed (rc {rc}): {' '.join(cmd)}\n{''.join(lines[-30:])}")
    return seen


def import_time(code: str, repeats: int) -> dict:
    """Wall and CPU seconds of `python -c code` in a fresh interpreter (median of repeats)."""
    wall, cpu = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
        wall.append(time.monotonic() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall": round(statistics.median(wall), 2), "cpu": round(statistics.median(cpu), 2),
            "walls": [round(w, 2) for w in wall]}


def launch(a: argparse.Namespace) -> dict:
    demo = [sys.executable, "-m", "ascendfactory", "train", str(REPO / "configs" / "demo.yaml"), "qwen2-tiny",
            "sft-demo"]
    runs, floors, torch_only = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        _timed([sys.executable, "-m", "ascendfactory.demo", "demo_work"], cwd)
        # Warm: preprocessed data and converted weights in place, every file read once (page cache).
        _timed(demo + ["--train_iters=2", "--lr_warmup_iters=1"], cwd)
        for r in range(a.launch_repeats):
            shutil.rmtree(cwd / "demo_work" / "output" / "sft-demo" / "saved_checkpoints", ignore_errors=True)
            runs.append(_timed(demo + ["--log_interval=1"], cwd, stop_at="iteration 1"))
            floors.append(import_time("import torch, megatron.core", 1)["wall"])
            torch_only.append(import_time("import torch", 1)["wall"])
            print(f"launch repeat {r + 1}: command -> iteration 1 {runs[-1]['iteration_1_start']:.1f} s, import torch +"
                  f" megatron.core {floors[-1]:.1f} s; load average {os.getloadavg()[0]:.1f}", flush=True)
    cpu_floor = import_time("import torch, megatron.core", a.launch_repeats)
    med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0] if k != "cpu_at_iteration_1"}
    cpu = [r["cpu_at_iteration_1"] for r in runs]
    # The critical path: train, then torchrun, then one worker (the workers run side by side).
    med["cpu_critical_path"] = round(statistics.median(c["train"] + c["torchrun"] + max(c["workers"]) for c in cpu), 2)
    floor = statistics.median(floors)
    return {
        "launch_runs": runs, "launch_median_s": med,
        "import_torch_megatron_core_s": {"wall_median": round(floor, 2), "walls": floors,
                                         "cpu_median": cpu_floor["cpu"]},
        "import_torch_s": {"wall_median": round(statistics.median(torch_only), 2), "walls": torch_only},
        "launch_minus_import_s": round(med["iteration_1_start"] - floor, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--gbs", type=int)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="iterations left out of the medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--launch-repeats", type=int, default=3)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-launch", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    ap.add_argument("--engine-worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine_worker:
        engine_worker(*a.engine_worker)
        return
    if a.plain_worker:
        print(json.dumps(plain_loop(*json.loads(a.plain_worker))))
        return
    result = {"load_average_start": os.getloadavg()}
    if not a.skip_throughput:
        result.update(throughput(a))
    if not a.skip_launch and a.device == "cpu":
        result.update(launch(a))
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    if not a.skip_throughput:
        print(f"engine / plain transformers+AdamW: {result['ratio_wall']:.3f} by wall time, {result['ratio_cpu']:.3f} "
              f"by CPU time (medians of {a.repeats} interleaved repeats)")
        if a.device == "cuda":
            print(f"MFU: engine {result['engine_mfu']:.1%}, plain {result['plain_mfu']:.1%} "
                  f"(peak {result['peak_tflops']:.0f} TFLOP/s)")
    if "launch_median_s" in result:
        m, f = result["launch_median_s"], result["import_torch_megatron_core_s"]
        print(f"launch overhead (demo sft-demo, warm rerun): command -> iteration 1 {m['iteration_1_start']:.2f} s "
              f"(train stage starts {m['train_running']:.2f} s, first worker line {m['first_worker_line']:.2f} s); "
              f"import torch + megatron.core in a fresh interpreter {f['wall_median']:.2f} s "
              f"({f['cpu_median']:.2f} s CPU); difference {result['launch_minus_import_s']:.2f} s; CPU seconds on the "
              f"critical path (train + torchrun + the slower worker, up to iteration 1) {m['cpu_critical_path']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
