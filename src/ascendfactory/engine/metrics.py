"""What a person reads: the Megatron-style line, per-rank log files, metrics.jsonl, TensorBoard, the loss plot."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ascendfactory.modelinfo import ModelFacts


class Log:
    """Every rank writes `<logs_dir>/train_rank_XXX.log`; rank 0 also prints to stdout."""

    def __init__(self, logs_dir: Path, rank: int):
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.file = open(logs_dir / f"train_rank_{rank:03d}.log", "a", buffering=1)

    def info(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        self.file.write(line + "\n")
        if self.rank == 0:
            print(line, flush=True)

    def warn(self, msg: str) -> None:
        self.file.write(f"warning: {msg}\n")
        if self.rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


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
    """Rank 0's record of logged iterations: metrics.jsonl (appended, one object per line) and TensorBoard."""

    def __init__(self, logs_dir: Path):
        self.path = logs_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(logs_dir / "tensorboard"))
        except ImportError:
            pass

    def record(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, row["iteration"])

    def record_eval(self, row: dict) -> None:
        """A validation row (iteration, val_loss, val_ppl, val_tokens); TensorBoard tags as Megatron's."""
        self.file.write(json.dumps(row) + "\n")
        if self.tb is not None:
            self.tb.add_scalar("lm loss validation", row["val_loss"], row["iteration"])
            self.tb.add_scalar("lm loss validation ppl", row["val_ppl"], row["iteration"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
