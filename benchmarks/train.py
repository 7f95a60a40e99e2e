"""Training throughput: our engine (megatron-core, torchrun, 1 process) vs a plain transformers model + torch
AdamW loop, same model, same tokens, same batch shape; plus launch overhead (command start -> first iteration).

    python benchmarks/train.py [--hidden 256] [--layers 4] [--seq 256] [--gbs 8] [--iters 12] [--threads 2]
    python benchmarks/train.py --device cuda [--peak-tflops 989]

CPU: a small Qwen2-shaped model in fp32. cuda: a random-init Qwen2-0.5B-shaped model (hidden 896, 24 layers,
14 heads / 2 KV heads, FFN 4864, vocabulary 151,936, tied embeddings) in bf16 (the plain loop: fp32 weights
under bf16 autocast, fused AdamW, SDPA attention), reporting MFU = model TFLOP/s / the GPU's dense bf16 peak.
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


def plain_run(model_dir: Path, prefix: str, seq: int, gbs: int, iters: int, threads: int, lr: float,
              device: str) -> float:
    """tokens/s of transformers + torch.optim.AdamW on the same token stream (median after warm-up)."""
    import contextlib

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    ds = IndexedDataset(prefix)
    tokens = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
    model.train()
    gpu = device != "cpu"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=gpu)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    per_batch = gbs * (seq + 1)
    speeds = []
    for it in range(iters):
        start = (it * per_batch) % (len(tokens) - per_batch)
        chunk = torch.from_numpy(tokens[start:start + per_batch]).view(gbs, seq + 1).to(device)
        sync()
        t0 = time.perf_counter()
        with autocast:
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        speeds.append(gbs * seq / (time.perf_counter() - t0))
    return statistics.median(speeds[2:])


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--gbs", type=int)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    a = ap.parse_args()
    gpu = a.device == "cuda"
    # cuda: Qwen2-0.5B's shape; cpu: a small model that trains in seconds.
    shape = (dict(hidden_size=a.hidden or 896, intermediate_size=(a.hidden or 896) * 38 // 7,
                  num_hidden_layers=a.layers or 24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  tie_word_embeddings=True) if gpu else
             dict(hidden_size=a.hidden or 256, intermediate_size=(a.hidden or 256) * 11 // 4,
                  num_hidden_layers=a.layers or 4, num_attention_heads=4, num_key_value_heads=2))
    seq, gbs = a.seq or (2048 if gpu else 256), a.gbs or 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = E.make_model(root, max_position_embeddings=max(seq, 256), **shape)
        prefix = E.write_pretrain(root / "data", model, docs=8000 if gpu else 2000)
        cfg = E.write_config(root / "run", model, root / "data", stage="pt", seq_len=seq, max_pe=max(seq, 256),
                             global_batch_size=gbs, micro_batch_size=gbs, train_iters=a.iters, save_interval=10**6,
                             lr=1e-4, min_lr=1e-5, lr_warmup_iters=0, device=a.device,
                             precision="bf16" if gpu else "fp32")
        ours, launch = engine_run(cfg, a.threads)
        plain = plain_run(model, prefix, seq, gbs, a.iters, a.threads, 1e-4, a.device)
        from ascendfactory.engine.metrics import flops_per_token
        from ascendfactory.modelinfo import read_model_facts

        tflop_per_token = flops_per_token(read_model_facts(str(model)), seq) / 1e12
    result = {
        "model": f"qwen2-shaped hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
                 f"{'bf16' if gpu else 'fp32'}, {a.device}",
        "seq_len": seq, "gbs": gbs, "threads": a.threads, "engine_tokens_per_s": round(ours, 1),
        "plain_tokens_per_s": round(plain, 1), "ratio_engine_over_plain": round(ours / plain, 3),
        "launch_to_first_iteration_s": round(launch, 2),
    }
    if gpu:
        peak = peak_tflops(a.peak_tflops)
        result.update(peak_tflops=peak, engine_mfu=round(ours * tflop_per_token / peak, 4),
                      plain_mfu=round(plain * tflop_per_token / peak, 4))
    print(json.dumps(result, indent=1))
    print(f"engine {ours:.0f} tokens/s vs plain transformers+AdamW {plain:.0f} tokens/s: ratio {ours / plain:.2f}; "
          f"launch overhead (command -> first iteration) {launch:.1f} s")
    if gpu:
        print(f"MFU: engine {result['engine_mfu']:.1%}, plain {result['plain_mfu']:.1%} (peak {peak:.0f} TFLOP/s)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
