"""One training run: megatron-core GPTModel + DDP + (distributed) Adam + OptimizerParamScheduler, driven by
megatron-core's forward/backward schedules (1F1B when PP > 1). No device branches: see device.py."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ascendfactory import logs
from ascendfactory.ckpt import files as L
from ascendfactory.ckpt.reader import trust_checkpoints
from ascendfactory.config.loader import load_resolved
from ascendfactory.config.paths import RunPaths, run_id, run_paths
from ascendfactory.config.rules import lr_problem, parallel_problem
from ascendfactory.config.schema import ExpConfig
from ascendfactory.data.stage import find_data_prefix
from ascendfactory.engine import device, moe
from ascendfactory.engine.checkpoint import Checkpointer, RankPlace, TrainState, check_loadable
from ascendfactory.engine.data import MicroBatches, PretrainData, SFTData, eod_id
from ascendfactory.engine.evaluate import Evaluator, loss_totals, pretrain_split
from ascendfactory.engine.faults import Diverged, StopRequest, kill_point
from ascendfactory.engine.lora import LoRASpec, apply_lora
from ascendfactory.engine.metrics import Metrics, flops_per_token
from ascendfactory.engine.model import Parallel, build_gpt_model, transformer_config
from ascendfactory.engine.training_math import seq_len_problem, seq_unit, warmup_iters, warmup_problem
from ascendfactory.errors import EXIT_OK, UserError, UserErrors
from ascendfactory.layout import padded_vocab_size, parse_layer_list, stage_layers
from ascendfactory.modelinfo import read_model_facts

log = logging.getLogger(logs.TRAIN)


@dataclass(frozen=True)
class Source:
    """Where the starting weights come from."""

    what: str  # "random" | "weights" (mode 1) | "resume" (mode 2 or auto-resume)
    ckpt_dir: Path | None = None
    iteration: int = 0
    require_manifest: bool = False


def choose_source(cfg: ExpConfig, paths: RunPaths, checkpointer: Checkpointer) -> Source:
    """train_auto_resume (or a torchrun restart after a worker died): the newest valid checkpoint in save_dir
    first; otherwise ckpt_load_type decides. A restart without auto-resume takes only this run's own checkpoints
    (another run's may be in save_dir: the restart must not continue that one)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart:
        log.info(f"torchrun restart {restart}: resuming from the newest valid checkpoint in {paths.save_dir}")
    if cfg.train_auto_resume or restart:
        it = checkpointer.resume_point(own_run_only=not cfg.train_auto_resume)
        if it is not None:
            return Source("resume", paths.save_dir, it, require_manifest=True)
        log.info(f"train_auto_resume: no complete checkpoint in {paths.save_dir}; using ckpt_load_type "
                 f"{cfg.ckpt_load_type}")
    if cfg.ckpt_load_type == 0:
        return Source("random")
    if cfg.ckpt_load_type not in (1, 2):
        raise UserError(f"ckpt_load_type: {cfg.ckpt_load_type} is not 0, 1 or 2")
    ckpt_dir = paths.converted_ckpt_dir
    it = L.read_tracker(ckpt_dir)
    return Source("weights" if cfg.ckpt_load_type == 1 else "resume", ckpt_dir, it)


def train_iters_of(cfg: ExpConfig, samples_per_epoch: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(samples_per_epoch * cfg.epochs / cfg.global_batch_size))
    if not cfg.train_iters or cfg.train_iters <= 0:
        raise UserError("train_iters: must be > 0 (or set epochs)")
    return cfg.train_iters


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    # Megatron's rule: stages differ so their layers do not start identical.
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _core(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def init_distributed(backend: str) -> None:
    """init_process_group on a store whose keys are private to this torchrun attempt.

    torchrun's static rendezvous keeps one store across restarts, so a restarted rank could read the
    address a dead rank published in the previous attempt and fail with "Connection refused".
    """
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", store),
                            rank=rank, world_size=world)


@dataclass(frozen=True)
class Step:
    """One optimizer step as every rank sees it (loss and stop request all-reduced)."""

    loss: float
    grad_norm: float | None
    seconds: float
    tokens: float  # per device
    stopping: bool
    load_balancing_loss: float | None = None  # MoE

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.loss) or (self.grad_norm is not None and not math.isfinite(self.grad_norm))


class Trainer:
    def __init__(self, cfg: ExpConfig):
        self.cfg = cfg
        self.paths = run_paths(cfg)
        self.dev = device.setup(cfg.device)
        self.precision = self.dev.default_precision if cfg.precision == "auto" else cfg.precision
        init_distributed(self.dev.backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        logs.to_file(self.paths.logs_dir / f"train_rank_{self.rank:03d}.log")
        self.stop = StopRequest()
        self.stop.install()

    # ------------------------------------------------------------ setup

    def setup(self, data: bool = True) -> None:
        """data=False (a reshard): no dataset; train_iters as the config says."""
        from megatron.core import parallel_state as ps

        cfg = self.cfg
        # The rules `plan` checks, again against the world torchrun gave (value ranges are the schema's).
        if problems := [p for p in (parallel_problem(cfg, self.world), seq_len_problem(cfg), lr_problem(cfg)) if p]:
            raise UserErrors(problems)
        ps.initialize_model_parallel(cfg.tp, cfg.pp, context_parallel_size=cfg.cp, **moe.parallel_state_kwargs(cfg))
        self.dp = ps.get_data_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group()
        self.num_micro = cfg.global_batch_size // (cfg.micro_batch_size * self.dp)
        # Model replicas, as megatron-core's DDP and distributed optimizer see them: DP x CP ranks.
        self.place = RankPlace(cfg.tp, cfg.pp, ps.get_data_parallel_world_size(with_context_parallel=True),
                               ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                               ps.get_data_parallel_rank(with_context_parallel=True), cfg.ep,
                               ps.get_expert_model_parallel_rank(), ps.get_expert_data_parallel_rank())
        _seed_all(cfg.seed)

        self.checkpointer = Checkpointer(
            self.paths.save_dir, self.place, interval=cfg.save_interval, keep=cfg.save_total_limit,
            run_id=run_id(cfg), source_model=cfg.model_name_or_path,
            distributed_optimizer=cfg.use_distributed_optimizer, stop=self.stop, grace_period=cfg.save_grace_period,
            ckpt_format=cfg.ckpt_format, async_save=cfg.async_save)
        self.facts = read_model_facts(cfg.model_name_or_path)
        self.num_layer_list = parse_layer_list(cfg.num_layer_list)
        self.layer_split = stage_layers(self.facts.num_layers, cfg.pp, self.num_layer_list,
                                        keys=("num_layer_list", "pipeline_model_parallel_size"))
        self.source = choose_source(cfg, self.paths, self.checkpointer)
        src = self.source
        if src.ckpt_dir is not None:
            self.padded_vocab = check_loadable(src.ckpt_dir, src.iteration, self.place, self.layer_split,
                                               src.require_manifest, src.what == "resume", cfg.ckpt_format)
        else:  # `or 1`: TP ranks need equal vocabulary slices even without the option
            self.padded_vocab = padded_vocab_size(self.facts.vocab_size, cfg.tp, cfg.make_vocab_size_divisible_by or 1)
        if data:
            self._open_data()
        else:
            self.train_iters = cfg.train_iters
        self._build_model()
        self._build_optimizer()
        self.state = TrainState(_core(self.model), self.optimizer, self.scheduler, self._checkpoint_args())
        self.skipped = 0
        self._load()
        if not data:
            return
        self.metrics = Metrics(self.paths.logs_dir, self.rank, cfg.log_interval, self.train_iters,
                               cfg.global_batch_size)
        self.flops_per_token = flops_per_token(self.facts, cfg.seq_len, frozen_weights=self.lora is not None)
        self.batches = MicroBatches(self.data, self.state.consumed, cfg.micro_batch_size, ps.get_data_parallel_rank(),
                                    self.dp, cfg.seq_len, fixed_len=cfg.pp > 1, multiple=math.lcm(16, seq_unit(cfg)))
        self.evaluator = Evaluator.open(self)

    def _open_data(self) -> None:
        """The dataset and train_iters (epochs count samples), which sizes the LR schedule and the pretraining
        sample index."""
        cfg = self.cfg
        prefix = find_data_prefix(self.paths.processed_data_dir, cfg.stage)
        if cfg.stage == "pt":
            self.train_iters = train_iters_of(cfg, PretrainData.samples_per_epoch(prefix, cfg.seq_len))
            self.data = PretrainData(prefix, cfg.seq_len, self.train_iters * cfg.global_batch_size, cfg.seed,
                                     eod_id(cfg.model_name_or_path), self.facts.vocab_size, cfg.reset_position_ids,
                                     cfg.reset_attention_mask, self.paths.output_dir / "data_cache",
                                     pretrain_split(cfg, prefix))
        else:
            self.data = SFTData(prefix, cfg.seq_len, cfg.seed, cfg.pack, cfg.val_size)
            self.train_iters = train_iters_of(cfg, len(self.data))

    def _build_model(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.transformer.module import Float16Module

        cfg = self.cfg
        par = Parallel(cfg.tp, cfg.pp, cfg.cp, cfg.sequence_parallel, tuple(self.layer_split), cfg.ep)
        overrides, ignored = transformer_overrides(cfg.extra_args)
        if ignored:
            log.warning(f"extra_args {', '.join(ignored)}: not megatron-core TransformerConfig fields; ignored")
        self.tconfig = transformer_config(self.facts, par, self.precision,
                                          use_cpu_initialization=self.dev.cpu_initialization,
                                          **{**moe.config_overrides(cfg, self.facts, self.dev), **overrides})
        self.tconfig.batch_p2p_comm = self.dev.batched_p2p
        core = build_gpt_model(self.facts, self.tconfig, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(),
                               max_sequence_length=max(cfg.seq_len, self.facts.max_position_embeddings),
                               vocab_size=self.padded_vocab)
        self.lora = None
        if cfg.finetuning_type == "lora":
            self.lora = LoRASpec(cfg.lora_r, cfg.lora_alpha, tuple(cfg.lora_target_modules), cfg.lora_dropout)
            trainable, total = apply_lora(core, self.lora, cfg.seed, cfg.tp, ps.get_tensor_model_parallel_rank())
            log.info(f"LoRA r {self.lora.r}, alpha {self.lora.alpha:g} on {', '.join(self.lora.targets)}: "
                     f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%) "
                     "on this rank, the rest frozen")
        core.to(self.dev.torch_device)
        if self.precision != "fp32":
            core = Float16Module(self.tconfig, core)
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(self.tconfig, self.ddp_config, core)
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = self.model.no_sync

    def _build_optimizer(self) -> None:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        ocfg = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
            bf16=self.precision == "bf16", fp16=self.precision == "fp16",
            params_dtype=self.tconfig.params_dtype, use_distributed_optimizer=self.ddp_config.use_distributed_optimizer,
            # fp16: dynamic loss scaling (Megatron's defaults); bf16 / fp32 need none.
            loss_scale=None, initial_loss_scale=2.0**16,
        )
        self.optimizer = get_megatron_optimizer(ocfg, [self.model])
        self.tconfig.grad_scale_func = self.optimizer.scale_loss if self.precision == "fp16" else None
        gbs = cfg.global_batch_size
        if problem := warmup_problem(cfg, self.train_iters):  # with `epochs`, known only now
            raise UserError(problem)
        warmup = warmup_iters(cfg, self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=warmup * gbs, lr_decay_steps=self.train_iters * gbs, lr_decay_style=cfg.lr_decay_style,
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=self.train_iters * gbs,
            wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        )

    def _checkpoint_args(self) -> dict:
        cfg = self.cfg
        return L.checkpoint_args(
            cfg.tp, cfg.pp, self.num_layer_list, cfg.model_name_or_path, self.facts.architecture,
            self.facts.vocab_size, self.padded_vocab, cfg.ep, self.facts.num_experts, data_parallel_size=self.dp,
            seq_length=cfg.seq_len,
            micro_batch_size=cfg.micro_batch_size, global_batch_size=cfg.global_batch_size,
            train_iters=self.train_iters, seed=cfg.seed, stage=cfg.stage,
            **(self.lora.checkpoint_args() if self.lora else {}), **moe.checkpoint_args(self.tconfig),
        )

    def _load(self) -> None:
        src, st = self.source, self.state
        if src.what == "random":
            log.info("weights: random init (ckpt_load_type 0), iteration 0")
            return
        full = src.what == "resume"
        consumed = self.checkpointer.load(src.ckpt_dir, src.iteration, st, full)
        if full:
            st.iteration = src.iteration
            st.consumed = int(consumed or src.iteration * self.cfg.global_batch_size)
        how = ("resumed (weights, optimizer, scheduler, RNG, data position)" if full
               else "weights only (fresh optimizer and schedule)")
        log.info(f"weights: {how} from {src.ckpt_dir / L.iter_dir_name(src.iteration)}, checkpoint iteration "
                 f"{src.iteration}; starting at iteration {st.iteration}, consumed samples {st.consumed}")

    # ------------------------------------------------------------ loop

    def run(self) -> int:
        cfg, st = self.cfg, self.state
        log.info(f"training {cfg.stage} on {self.world} {self.dev.kind} process(es): TP{cfg.tp} PP{cfg.pp} "
                 f"CP{cfg.cp} DP{self.dp}{f' EP{cfg.ep}' if cfg.ep > 1 else ''}, precision {self.precision}, "
                 f"{self.num_micro} micro-batches of "
                 f"{cfg.micro_batch_size}, global batch {cfg.global_batch_size}, train_iters {self.train_iters}, "
                 f"layers per pipeline stage {','.join(map(str, self.layer_split))}")
        try:
            if self.evaluator and st.iteration == 0:  # the validation curve starts from the loaded weights
                self.evaluator.run(0, self.metrics)
            while st.iteration < self.train_iters:
                step = self._train_step()
                last = st.iteration == self.train_iters
                if self.metrics.should_log(st.iteration, step.diverged):
                    self.metrics.log(self._row(step), *self._fp16_state())
                if step.diverged:
                    raise self._diverged(step)
                if self.evaluator and not step.stopping and self.evaluator.due(st.iteration):
                    self.evaluator.run(st.iteration, self.metrics)
                self._save_if_due(last, step.stopping)
                if step.stopping and not last:
                    return self.checkpointer.preempted(st.iteration)
        finally:
            self.metrics.close()
        self.metrics.plot(self.paths.loss_plot)
        log.info(f"training done: iteration {st.iteration}, checkpoint in {self.paths.save_dir}")
        return EXIT_OK

    def reshard(self, dst: Path) -> int:
        """Collective: the loaded state saved into dst in this run's layout and ckpt_format (engine/reshard.py)."""
        cfg = self.cfg
        Checkpointer(dst, self.place, interval=1, keep=0, run_id=run_id(cfg), source_model=cfg.model_name_or_path,
                     distributed_optimizer=cfg.use_distributed_optimizer, stop=self.stop, grace_period=0.0,
                     ckpt_format=cfg.ckpt_format).save(self.state)
        return EXIT_OK

    def _forward_step(self, data_iterator, model):
        from megatron.core.utils import get_batch_on_this_cp_rank

        # Batches are built on the host; a no-op where the CPU is the device.
        batch = {k: None if v is None else v.to(self.dev.torch_device, non_blocking=True)
                 for k, v in next(data_iterator).items()}
        batch = get_batch_on_this_cp_rank(batch, self.cp_group)  # this CP rank's chunks; CP1: unchanged
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                    **moe.routing_padding(batch["padding_mask"], self.tconfig))
        return out, partial(_loss_func, batch["loss_mask"], self.cp_group)

    def _train_step(self) -> Step:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        st = self.state
        t0, tokens0 = time.perf_counter(), self.batches.tokens_read
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=self.batches, model=[self.model],
            num_microbatches=self.num_micro, seq_length=self.cfg.seq_len,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=False,
        )
        kill_point("mid_iteration", st.iteration + 1, self.rank)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.cfg.global_batch_size)
        else:  # fp16 overflow: the step was skipped and the loss scale lowered
            self.skipped += 1
        balance = moe.load_balancing_loss(self.tconfig, self.num_micro)  # collective; None: dense
        st.iteration += 1
        st.consumed += self.cfg.global_batch_size
        # One all-reduce carries the loss of every DP replica and every rank's stop request.
        total = loss_totals(losses, self.place.tp_rank, self.dev.torch_device)
        v = torch.cat([total, total.new_tensor([1.0 if self.stop.requested else 0.0])])
        dist.all_reduce(v)
        seconds, tokens = time.perf_counter() - t0, (self.batches.tokens_read - tokens0) * self.dp / self.world
        return Step((v[0] / v[1].clamp(min=1)).item(), None if grad_norm is None else float(grad_norm), seconds,
                    tokens, stopping=v[2].item() > 0, load_balancing_loss=balance)

    def _row(self, step: Step) -> dict:
        """metrics.jsonl's row (and the log line's values) of the step just done."""
        row = {
            "iteration": self.state.iteration, "consumed_samples": self.state.consumed, "loss": step.loss,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]), "grad_norm": step.grad_norm,
            "tokens_per_sec": step.tokens / step.seconds,
            "tflops": self.flops_per_token * step.tokens / step.seconds / 1e12, "iter_ms": step.seconds * 1000.0,
        }
        if step.load_balancing_loss is not None:
            row[moe.LOAD_BALANCING_LOSS] = step.load_balancing_loss
        return row

    def _save_if_due(self, last: bool, stopping: bool) -> None:
        """The checkpointer's policy; with export_checkpoint: best the evaluator names the checkpoint to keep."""
        if self.evaluator:
            self.checkpointer.protect = self.evaluator.protect(self.state.iteration)
        if self.checkpointer.maybe_save(self.state, last, stopping) and self.evaluator:
            self.evaluator.saved(self.state.iteration)

    def _fp16_state(self) -> tuple[float | None, int]:
        """The loss scale (fp16 only) and the steps skipped on overflow, for Megatron's line."""
        scale = self.optimizer.get_loss_scale().item() if self.precision == "fp16" else None
        return scale, self.skipped

    def _diverged(self, step: Step) -> Diverged:
        """Every rank sees the same all-reduced loss and grad norm, so all stop here together, before a save."""
        newest = self.checkpointer.newest()
        kept = (f"the newest checkpoint, {self.paths.save_dir / L.iter_dir_name(newest)}, is from before"
                if newest is not None else "no checkpoint was saved")
        consumed = self.state.consumed
        gbs = self.cfg.global_batch_size
        return Diverged(f"iteration {self.state.iteration}: lm loss {step.loss}, grad norm {step.grad_norm}: training "
                        f"diverged; nothing of this iteration was saved and {kept}. Lower lr (now {self.cfg.lr:g}) or "
                        f"check the samples {consumed - gbs}-{consumed - 1} of the data order "
                        f"(precision {self.precision})")


def _loss_func(loss_mask: torch.Tensor, cp_group, per_token_loss: torch.Tensor):
    """Sum of the loss over tokens with a target, their count (megatron-core divides), and both for logging.

    Under CP this rank holds part of each sequence: the count is the whole sequence's, and the sum is scaled
    by the CP size because DDP averages gradients over DP x CP; the gradients then equal CP1's exactly."""
    mask = loss_mask.to(per_token_loss.dtype).reshape(-1)
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    n = mask.sum().to(torch.int)
    cp = cp_group.size()
    count = n.clone()
    if cp > 1:
        dist.all_reduce(count, group=cp_group)
    return loss_sum * cp, count, {"lm loss": torch.stack([loss_sum.detach(), n.float()])}


def transformer_overrides(extra_args: dict) -> tuple[dict, list[str]]:
    """extra_args entries naming TransformerConfig fields (recompute_granularity, attention_dropout, ...) are
    passed to the model config; the names of the others are returned so the log can say they were ignored."""
    from dataclasses import fields

    from megatron.core.transformer.transformer_config import TransformerConfig

    known = {f.name for f in fields(TransformerConfig)}
    return ({k: v for k, v in extra_args.items() if k in known}, sorted(k for k in extra_args if k not in known))


def main(config_path: str, reshard_to: str | None = None) -> int:
    cfg = load_resolved(config_path)
    trust_checkpoints(cfg.trust_checkpoint)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    try:
        if reshard_to:
            trainer.setup(data=False)
            return trainer.reshard(Path(reshard_to))
        trainer.setup()
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
