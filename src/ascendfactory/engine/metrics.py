"""What a person reads: the Megatron-style line, per-rank log files, metrics.jsonl, TensorBoard, the loss plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ascendfactory.logs import TRAIN
from ascendfactory.modelinfo import ModelFacts

log = logging.getLogger(TRAIN)


def flops_per_token(facts: ModelFacts, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6 x matmul weights (forward, input and weight gradients; 4 x when the weights
    are frozen, as under LoRA, whose adapters add next to nothing) plus the attention score/value matmuls. An MoE
    layer's weights are those a token meets: its router, top-k experts and the shared expert."""
    h, d = facts.hidden_size, facts.head_dim
    attn = h * facts.num_heads * d * 2 + h * facts.num_kv_heads * d * 2
    mlp = 3 * h * facts.ffn_hidden_size
    moe = h * facts.num_experts + 3 * h * (facts.moe_topk * facts.moe_ffn_hidden_size + facts.shared_expert_size)
    n_moe = len(facts.moe_layers)
    dense = facts.num_layers * attn + (facts.num_layers - n_moe) * mlp + n_moe * moe + facts.vocab_size * h
    return (4.0 if frozen_weights else 6.0) * dense + 12.0 * facts.num_layers * seq_len * facts.num_heads * d


class Metrics:
    """When and what the run logs: Megatron's line every `log_interval` iterations, at the last one and at a
    diverged one, on every rank (its log file; the console shows rank 0's), and rank 0's record of those rows:
    metrics.jsonl (appended, one object per line), TensorBoard, and the loss plot at the end."""

    def __init__(self, logs_dir: Path, rank: int, log_interval: int, train_iters: int, global_batch_size: int):
        self.interval, self.train_iters, self.gbs = log_interval, train_iters, global_batch_size
        self.path = logs_dir / "metrics.jsonl"
        self.file = self.tb = None
        if rank != 0:
            return
        self.file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(logs_dir / "tensorboard"))
        except ImportError:
            pass

    def should_log(self, iteration: int, diverged: bool = False) -> bool:
        return iteration % self.interval == 0 or iteration == self.train_iters or diverged

    def log(self, row: dict, loss_scale: float | None = None, skipped: int = 0) -> None:
        log.info(format_line(row, self.train_iters, self.gbs, loss_scale, skipped))
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["iteration"])

    def record_eval(self, row: dict) -> None:
        """A validation row (iteration, val_loss, val_ppl, val_tokens); TensorBoard tags as Megatron's."""
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.add_scalar("lm loss validation", row["val_loss"], row["iteration"])
            self.tb.add_scalar("lm loss validation ppl", row["val_ppl"], row["iteration"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()

    def plot(self, png: Path) -> None:
        """Rank 0: the loss curve of every row metrics.jsonl holds (earlier attempts' too)."""
        if self.file is not None and plot_loss(self.path, png):
            log.info(f"loss curve: {png}")


def format_line(row: dict, train_iters: int, gbs: int, loss_scale: float | None = None, skipped: int = 0) -> str:
    """Megatron's log line; with fp16 also its loss scale and the steps skipped on overflow (no grad norm); MoE runs
    add the load-balancing loss."""
    gn = "skipped" if row["grad_norm"] is None else f"{row['grad_norm']:.4f}"
    fp16 = "" if loss_scale is None else f"loss scale: {loss_scale:.1f} | "
    line = (
        f"iteration {row['iteration']:8d}/{train_iters:8d} | consumed samples: {row['consumed_samples']:12d} | "
        f"elapsed time per iteration (ms): {row['iter_ms']:.1f} | learning rate: {row['lr']:.6E} | "
        f"global batch size: {gbs:5d} | lm loss: {row['loss']:.6E} | {fp16}grad norm: {gn} | "
        f"tokens/s/device: {row['tokens_per_sec']:.1f} | TFLOP/s/device: {row['tflops']:.4f} |"
    )
    if row.get("load_balancing_loss") is not None:  # MoE: the router's auxiliary loss, as Megatron logs it
        line = f"{line} load_balancing_loss: {row['load_balancing_loss']:.6E} |"
    return line if loss_scale is None else f"{line} number of skipped iterations: {skipped:3d} |"


def validation_line(row: dict) -> str:
    """Megatron's validation line."""
    return (f" validation loss at iteration {row['iteration']} | lm loss value: {row['val_loss']:.6E} | "
            f"lm loss PPL: {row['val_ppl']:.3E} |")


def read_losses(metrics_path: Path, key: str = "loss") -> dict[int, float]:
    """iteration -> loss (key "val_loss": the validation loss), the last record winning (a resumed run re-logs
    the iterations it repeats)."""
    out = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
                out[row["iteration"]] = row[key]
            except (ValueError, KeyError, TypeError):  # blank, cut short by a kill, or not a row of ours
                continue
    return out


def plot_loss(metrics_path: Path, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    losses = read_losses(metrics_path)
    its = sorted(losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(its, [losses[i] for i in its], label="training")
    val = read_losses(metrics_path, "val_loss")
    if val:
        ax.plot(sorted(val), [val[i] for i in sorted(val)], marker="o", label="validation")
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title("training and validation loss" if val else "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # A new file renamed over the old: never written through whatever the old path was (e.g. a link).
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, png)
    return True
