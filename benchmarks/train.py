"""Training throughput: our engine (megatron-core, torchrun, 1 CPU process) vs a plain transformers model +
torch AdamW loop, same model, same tokens, same batch shape, same thread count; plus launch overhead
(command start -> first iteration logged).

    python benchmarks/train.py [--hidden 256] [--layers 4] [--seq 256] [--gbs 8] [--iters 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _engine as E  # noqa: E402  (tiny model, indexed data and config helpers shared with the tests)


def engine_run(cfg: Path, threads: int) -> tuple[float, float]:
    """(median tokens/s after warm-up, seconds from command start to the first iteration line)."""
    env = E.engine_env(OMP_NUM_THREADS=threads)
    t0 = time.monotonic()
    proc = subprocess.Popen(E.engine_cmd(cfg, 1), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    first = None
    for line in proc.stdout:
        if first is None and "iteration        1/" in line:
            first = time.monotonic() - t0
    if proc.wait() != 0:
        raise SystemExit("engine run failed; run it by hand: " + " ".join(E.engine_cmd(cfg, 1)))
    rows = E.metrics(Path(cfg).parent)
    return statistics.median(r["tokens_per_sec"] for r in rows[2:]), first


def plain_run(model_dir: Path, prefix: str, seq: int, gbs: int, iters: int, threads: int, lr: float) -> float:
    """tokens/s of transformers + torch.optim.AdamW on the same token stream (median after warm-up)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    per_batch = gbs * (seq + 1)
    speeds = []
    for it in range(iters):
        start = (it * per_batch) % (len(tokens) - per_batch)
        chunk = torch.from_numpy(tokens[start:start + per_batch]).view(gbs, seq + 1)
        t0 = time.perf_counter()
        out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(gbs * seq / (time.perf_counter() - t0))
    return statistics.median(speeds[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = E.make_model(root, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                             num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2)
        prefix = E.write_pretrain(root / "data", model, docs=2000)
        cfg = E.write_config(root / "run", model, root / "data", stage="pt", seq_len=a.seq, global_batch_size=a.gbs,
                             micro_batch_size=a.gbs, train_iters=a.iters, save_interval=10**6, lr=1e-4,
                             min_lr=1e-5, lr_warmup_iters=0)
        ours, launch = engine_run(cfg, a.threads)
        plain = plain_run(model, prefix, a.seq, a.gbs, a.iters, a.threads, 1e-4)
    result = {
        "model": f"qwen2-shaped hidden {a.hidden}, {a.layers} layers, fp32", "seq_len": a.seq, "gbs": a.gbs,
        "threads": a.threads, "engine_tokens_per_s": round(ours, 1), "plain_tokens_per_s": round(plain, 1),
        "ratio_engine_over_plain": round(ours / plain, 3), "launch_to_first_iteration_s": round(launch, 2),
    }
    print(json.dumps(result, indent=1))
    print(f"engine {ours:.0f} tokens/s vs plain transformers+AdamW {plain:.0f} tokens/s: ratio {ours / plain:.2f}; "
          f"launch overhead (command -> first iteration) {launch:.1f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
