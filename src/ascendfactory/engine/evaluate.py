"""Validation while training: the held-out samples, forward only through megatron-core's schedule (1F1B under PP),
the loss reduced exactly as training's, and the best checkpoint (export_checkpoint: best).

An evaluation runs in eval mode without gradients and puts every RNG back as it was, so a run with evaluation
trains bit-identically to one without; it reads only the weights, so a resumed run evaluates as the first did.
"""

from __future__ import annotations

import json
import logging
import math

import torch
import torch.distributed as dist

from ascendfactory import logs, validation
from ascendfactory.ckpt import files as L
from ascendfactory.data.stage import eval_data_dir, find_data_prefix
from ascendfactory.engine import device
from ascendfactory.engine.data import (
    EvalSamples,
    PretrainData,
    SFTData,
    eod_id,
    gpt_sample,
)
from ascendfactory.engine.metrics import validation_line
from ascendfactory.errors import UserError
from ascendfactory.fsutil import write_text_atomic

log = logging.getLogger(logs.TRAIN)


def loss_totals(losses: list[dict], tp_rank: int, torch_device) -> torch.Tensor:
    """[loss sum, target tokens] of this rank's micro-batches; only the last pipeline stage has losses and only
    TP rank 0 counts them (the TP ranks hold the same), so an all-reduce over every rank gives the totals.
    float32 on the device: the all-reduce backend needs it there, and HCCL reduces no float64."""
    total = torch.zeros(2, dtype=torch.float32, device=torch_device)
    if losses and tp_rank == 0:
        for d in losses:
            total += d["lm loss"]
    return total


def pretrain_split(cfg, prefix: str) -> str:
    """Megatron's split for the training dataset: `split` as given, val_size as the held-out share of the
    documents (a whole val_size counts documents), else everything for training."""
    if cfg.split:
        return cfg.split
    if not cfg.val_size:
        return "100,0,0"
    if cfg.val_size >= 1:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        docs = len(IndexedDataset(prefix).document_indices) - 1
        fraction = validation.held_out_count(cfg.val_size, docs, "documents of the dataset") / docs
    else:
        fraction = cfg.val_size
    return f"{100 * (1 - fraction):.9f},{100 * fraction:.9f},0"


def _samples(trainer) -> tuple[EvalSamples, int] | None:
    """The validation samples and their number: a separate dataset, or those held out of the training data."""
    cfg = trainer.cfg
    if cfg.eval_dataset or cfg.eval_processed_data_dir:
        prefix = find_data_prefix(eval_data_dir(cfg, trainer.paths), cfg.stage)
        if cfg.stage == "pt":
            ds = PretrainData(prefix, cfg.seq_len, None, cfg.seed, eod_id(cfg.model_name_or_path),
                              trainer.facts.vocab_size, cfg.reset_position_ids, cfg.reset_attention_mask,
                              trainer.paths.output_dir / "data_cache" / "validation").dataset
            return EvalSamples(lambda j: gpt_sample(ds, j), len(ds)), len(ds)
        ds = SFTData(prefix, cfg.seq_len, cfg.seed, cfg.pack)
        return EvalSamples(ds.sample, len(ds)), len(ds)
    if cfg.stage == "pt" and validation.valid_fraction(cfg) > 0:
        ds = trainer.data.valid
        if ds is None or len(ds) == 0:
            key = "split" if cfg.split else "val_size"
            raise UserError(f"{key} = {getattr(cfg, key)}: holds out no whole document of the pretraining data; "
                            f"raise {key}")
        return EvalSamples(lambda j: gpt_sample(ds, j), len(ds)), len(ds)
    held = getattr(trainer.data, "held_out", ())
    if len(held):
        return EvalSamples(lambda j: trainer.data.sample(int(held[j])), len(held)), len(held)
    return None


class Evaluator:
    def __init__(self, trainer, samples: EvalSamples, n: int):
        cfg = trainer.cfg
        self.t, self.samples, self.n = trainer, samples, n
        self.batches = validation.eval_batches(cfg.eval_iters, n, cfg.global_batch_size)
        self.interval = validation.interval(cfg)
        self.best_file = trainer.paths.best_checkpoint
        self.track_best = cfg.export_checkpoint == "best"
        self.best = self._resumed_best() if self.track_best else None
        self.last: dict | None = None  # the newest evaluation's row
        log.info(f"validation: {n} samples, {self.batches} global batch(es) of {cfg.global_batch_size} per "
                 f"evaluation, at iteration 0, every {self.interval} iterations and at the end")

    @classmethod
    def open(cls, trainer) -> Evaluator | None:
        found = _samples(trainer)
        return None if found is None else cls(trainer, *found)

    def _resumed_best(self) -> dict | None:
        """The best checkpoint recorded before a resume, while it is still there and not newer than the resume."""
        try:
            best = json.loads(self.best_file.read_text())
            it = int(best["iteration"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        save_dir = self.t.paths.save_dir
        return best if 0 < it <= self.t.state.iteration and (save_dir / L.iter_dir_name(it)).is_dir() else None

    def due(self, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == self.t.train_iters

    def run(self, iteration: int, metrics) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t, cfg = self.t, self.t.cfg
        rng = device.rng_state()
        t.model.eval()  # no dropout
        try:
            with torch.no_grad():
                losses = get_forward_backward_func()(
                    forward_step_func=t._forward_step, data_iterator=t.batches.over(self.samples),
                    model=[t.model], num_microbatches=self.batches * t.num_micro, seq_length=cfg.seq_len,
                    micro_batch_size=cfg.micro_batch_size, forward_only=True,
                )
        finally:
            t.model.train()
            device.set_rng_state(rng)
        total = loss_totals(losses, t.place.tp_rank, t.dev.torch_device)
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        # Megatron's PPL, capped so that a diverged model prints a number
        row = {"iteration": iteration, "val_loss": loss, "val_ppl": math.exp(min(20.0, loss)),
               "val_tokens": int(total[1].item())}
        log.info(validation_line(row))
        metrics.record_eval(row)
        self.last = row
        return row

    def _candidate(self, iteration: int) -> dict | None:
        """The best checkpoint once this iteration's is saved: this one when its evaluation is the lowest yet."""
        now = self.last if self.last and self.last["iteration"] == iteration else None
        if now and (self.best is None or now["val_loss"] < self.best["val_loss"]):
            path = self.t.paths.save_dir / L.iter_dir_name(iteration)
            return {"iteration": iteration, "val_loss": now["val_loss"], "path": str(path)}
        return self.best

    def protect(self, iteration: int) -> int | None:
        """The iteration save_total_limit must keep while saving this one (export_checkpoint: best)."""
        best = self._candidate(iteration) if self.track_best else None
        return best["iteration"] if best else None

    def saved(self, iteration: int) -> None:
        """After a save: name the checkpoint with the lowest validation loss in the log and best_checkpoint.json."""
        best = self._candidate(iteration) if self.track_best else None
        if best is None or best is self.best:
            return
        self.best = best
        if self.t.rank == 0:
            write_text_atomic(self.best_file, json.dumps(best, indent=1))
        log.info(f"best checkpoint: iteration {iteration} (validation loss {best['val_loss']:.6E}), "
                 f"{best['path']}; recorded in {self.best_file}")
