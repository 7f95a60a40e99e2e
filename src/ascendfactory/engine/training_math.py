"""Training math the trainer uses and `plan` / `train` check before any stage runs (no torch here): the lr warmup
length, and the unit every micro-batch length must divide into."""

from __future__ import annotations

import math


def warmup_iters(cfg, train_iters: int) -> int:
    return int(cfg.lr_warmup_fraction * train_iters) if cfg.lr_warmup_fraction is not None else cfg.lr_warmup_iters


def warmup_problem(cfg, train_iters: int) -> str | None:
    """The warmup must end before the run does (with `epochs`, train_iters is known only to the trainer)."""
    warmup = warmup_iters(cfg, train_iters)
    if warmup >= train_iters:
        key = "lr_warmup_fraction" if cfg.lr_warmup_fraction is not None else "lr_warmup_iters"
        return (f"{key}: lr warmup ({warmup} iterations) must be shorter than train_iters ({train_iters}); "
                f"lower {key}")
    return None


def seq_unit(cfg) -> int:
    """What every micro-batch length must divide into: 2 x CP chunks (megatron's load-balanced CP split) and,
    with sequence_parallel, each CP rank's share over the TP ranks."""
    sp_tp = cfg.tp if cfg.sequence_parallel else 1
    return math.lcm(2 * cfg.cp if cfg.cp > 1 else 1, sp_tp * cfg.cp)


def seq_len_problem(cfg) -> str | None:
    unit = seq_unit(cfg)
    if cfg.seq_len % unit == 0:
        return None
    parts = [f"2 x context_parallel_size ({2 * cfg.cp})"] if cfg.cp > 1 else []
    if cfg.sequence_parallel and cfg.tp > 1:
        parts.append(f"tensor_model_parallel_size x context_parallel_size ({cfg.tp * cfg.cp}) with sequence_parallel")
    return f"seq_len ({cfg.seq_len}) must be divisible by {' and '.join(parts)}; use a multiple of {unit}"


def config_problems(cfg) -> list[str]:
    """What the trainer would refuse in the resolved config, for the pipeline's report (config.rules has the
    rest). With `epochs`, the warmup is checked by the trainer once it knows train_iters."""
    found = [seq_len_problem(cfg)]
    if cfg.epochs is None and cfg.train_iters and cfg.train_iters > 0:
        found.append(warmup_problem(cfg, cfg.train_iters))
    return [p for p in found if p]
