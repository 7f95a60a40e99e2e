"""LoRA vs full fine-tuning in our engine, same model, data and batch shape, in one run: tokens/s, the worker's
peak memory (RSS) and the checkpoint size. The baseline is full fine-tuning (every weight gets a gradient and
Adam's two moments).

    python benchmarks/lora.py [--hidden 512] [--layers 4] [--seq 256] [--gbs 8] [--iters 12] [--threads 2] [--r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _engine as E  # noqa: E402  (tiny model, indexed data and config helpers shared with the tests)


def measure(cfg: Path, threads: int) -> dict:
    """One engine run in a child process: median tokens/s after warm-up, its peak RSS, the checkpoint's bytes.
    Each run gets a fresh interpreter (ours) so RUSAGE_CHILDREN's peak is that run's worker alone."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *E.engine_cmd(cfg, 1)], env=E.engine_env(OMP_NUM_THREADS=threads),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit("engine run failed; run it by hand: " + " ".join(E.engine_cmd(cfg, 1)))
    run = Path(cfg).parent
    rows = E.metrics(run)
    ckpt = sum(p.stat().st_size for p in (run / "saved_checkpoints").rglob("*.pt"))
    return {"tokens_per_s": round(statistics.median(r["tokens_per_sec"] for r in rows[2:]), 1),
            "peak_rss_mb": round(int(out.stdout.split()[-1]) / 1024, 1), "checkpoint_mb": round(ckpt / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = E.make_model(root, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                             num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                             max_position_embeddings=max(a.seq, 256))
        E.write_pretrain(root / "data", model, docs=2000)
        from ascendfactory.convert.api import hf_to_megatron

        hf_to_megatron(str(model), str(root / "converted"), 1, 1, None, None, None)
        common = dict(stage="pt", seq_len=a.seq, max_pe=max(a.seq, 256), global_batch_size=a.gbs,
                      micro_batch_size=a.gbs, train_iters=a.iters, save_interval=10**6, lr=1e-4, min_lr=1e-5,
                      lr_warmup_iters=0, ckpt_load_type=1, user_converted_ckpt_path=str(root / "converted"))
        full = measure(E.write_config(root / "full", model, root / "data", **common), a.threads)
        lora = measure(E.write_config(root / "lora", model, root / "data", finetuning_type="lora", lora_r=a.r,
                                      lora_alpha=2 * a.r, **common), a.threads)
    result = {"model": f"qwen2-shaped hidden {a.hidden}, {a.layers} layers, fp32, cpu", "seq_len": a.seq,
              "gbs": a.gbs, "lora_r": a.r, "threads": a.threads, "full": full, "lora": lora,
              "ratio_tokens_per_s_lora_over_full": round(lora["tokens_per_s"] / full["tokens_per_s"], 3),
              "ratio_peak_rss_lora_over_full": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
              "ratio_checkpoint_lora_over_full": round(lora["checkpoint_mb"] / full["checkpoint_mb"], 3)}
    print(json.dumps(result, indent=1))
    print(f"LoRA r {a.r}: {result['ratio_tokens_per_s_lora_over_full']:.2f}x the tokens/s of full fine-tuning, "
          f"{result['ratio_peak_rss_lora_over_full']:.2f}x its peak memory, "
          f"{result['ratio_checkpoint_lora_over_full']:.2f}x its checkpoint size")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
