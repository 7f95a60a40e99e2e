"""Atomic Megatron checkpoints with a manifest, and finding / loading the one to start from.

A save writes every file under `<save_dir>/.tmp_iter_XXXXXXX/`, fsyncs them, writes manifest.json
(files, sizes and crc32 checksums taken while writing, layout, iteration, consumed samples, source model, the args
`plan` checks an auto-resume against: ckpt/files.MANIFEST_ARGS),
renames the folder to `iter_XXXXXXX` and only then replaces the tracker. A crash at any instant therefore
leaves either no new folder or a complete one; the previous checkpoint is never touched until a newer one is
complete. The Checkpointer holds the policy: when to save, what to keep, the save on a stop request.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ascendfactory.ckpt import files as L
from ascendfactory.ckpt.files import problem_of
from ascendfactory.ckpt.lora import LORA_A, is_lora_key, without_adapters
from ascendfactory.ckpt.reader import load_file, read_checkpoint_layout, resume_problem
from ascendfactory.engine import device, moe
from ascendfactory.engine.faults import StopRequest, kill_point
from ascendfactory.errors import EXIT_PREEMPTED, UserError
from ascendfactory.fsutil import fsync_dir, probe_writable
from ascendfactory.logs import TRAIN

DISTRIB_OPTIM_FILE = "distrib_optim.pt"
TMP_PREFIX = ".tmp_"
log = logging.getLogger(__name__)
train_log = logging.getLogger(TRAIN)  # the trainer's lines: "saved checkpoint iteration", the stop request


@dataclass(frozen=True)
class RankPlace:
    """This rank's place in the checkpoint. dp / dp_rank count model replicas as megatron-core's DDP and
    distributed optimizer do: the DP x CP ranks holding the same TP/PP shard. MoE: ep_rank holds its share of the
    experts; the expert-DP ranks (edp_rank) hold the same TP/PP/EP rank file, and rank 0 of them writes it (without
    EP: DP rank 0)."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1
    ep_rank: int = 0
    edp_rank: int = 0

    @property
    def writer(self) -> bool:
        return (self.edp_rank if self.ep > 1 else self.dp_rank) == 0

    def rank_dir(self, iter_path: Path) -> Path:
        return iter_path / L.rank_dir_name(self.tp_rank, self.pp_rank, self.pp, self.ep_rank, self.ep)

    def rank_file(self, ckpt_dir: Path, iteration: int) -> Path:
        return self.rank_dir(ckpt_dir / L.iter_dir_name(iteration)) / L.MODEL_FILE


@dataclass
class TrainState:
    """What a checkpoint holds: the model (megatron-core's module, not the DDP wrapper), optimizer, LR scheduler,
    the args written into every file, and the position in the run."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    args: dict
    iteration: int = 0
    consumed: int = 0


# ---------------------------------------------------------------- validation and discovery


def _first_problem(problem: str | None) -> str | None:
    """Collective: the first rank's problem, the same on every rank."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def newest_valid(save_dir: Path, run_id: str | None = None, check_content: bool = False) -> int | None:
    """The newest complete iteration in our own save dir (with run_id: of that run only); damaged newer ones are
    skipped with a warning. check_content (collective where distributed, each rank reading its share of the
    files): the checksums too."""
    spread = dist.is_initialized()
    share = (dist.get_rank(), dist.get_world_size()) if spread else (0, 1)
    for it in L.iterations_on_disk(save_dir):
        if run_id is not None and L.manifest_run_id(save_dir / L.iter_dir_name(it)) != run_id:
            continue
        problem = problem_of(save_dir / L.iter_dir_name(it), require_manifest=True,
                             share=share if check_content else None)
        if check_content and spread:
            problem = _first_problem(problem)
        if problem is None:
            return it
        log.warning(f"auto-resume skips {save_dir / L.iter_dir_name(it)}: {problem}")
    return None


def resume_point(save_dir: Path, run_id: str | None = None) -> int | None:
    """Collective: the newest intact checkpoint of our save dir (with run_id: of that run only), checksums read.
    When the tracker named another (a damaged or missing iteration, or no number), rank 0 points it at this one:
    the export and `plan` then see what the run resumed from."""
    it = newest_valid(save_dir, run_id, check_content=True)
    if it is not None and dist.get_rank() == 0:
        try:
            named = L.read_tracker(save_dir)
        except UserError:
            named = None
        if named != it:
            log.warning(f"{save_dir / L.TRACKER} named iteration {named}; now {it}, the newest intact checkpoint")
            L.write_tracker(save_dir, it)
    return it


def check_loadable(ckpt_dir: Path, iteration: int, place: RankPlace, run_split: list[int],
                   require_manifest: bool, full: bool, ckpt_format: str = "legacy") -> int:
    """The checkpoint, read before the model is built; returns its padded vocabulary size. torch_dist: complete
    (any layout: megatron-core reshards it). Legacy: complete, run's TP/PP/EP, run's layers per PP stage (each
    stage's file numbers its own layers from 0, so another split cannot be loaded). UserError otherwise."""
    iter_path = ckpt_dir / L.iter_dir_name(iteration)
    if L.is_torch_dist(iter_path):
        from ascendfactory.engine.dist_checkpoint import check_loadable as check_dist

        return check_dist(iter_path, require_manifest)
    ck = read_checkpoint_layout(ckpt_dir, iteration)
    problem = problem_of(iter_path, require_manifest)
    if problem:
        raise UserError(f"{iter_path}: cannot load ({problem}); pick another checkpoint")
    if full and (ck.tp, ck.pp, ck.ep) != (place.tp, place.pp, place.ep):
        raise UserError(L.legacy_resume_refusal(str(iter_path), ckpt_dir, (ck.tp, ck.pp, ck.ep),
                                                (place.tp, place.pp, place.ep), ckpt_format))
    if (ck.tp, ck.pp) != (place.tp, place.pp):
        raise UserError(
            f"{iter_path}: checkpoint layout TP{ck.tp} PP{ck.pp} differs from the run's TP{place.tp} PP{place.pp}; "
            f"set tensor-model-parallel-size={ck.tp} pipeline-model-parallel-size={ck.pp} or convert the weights "
            "again"
        )
    if ck.ep != place.ep:
        raise UserError(f"{iter_path}: checkpoint has EP{ck.ep}, but the run uses expert_model_parallel_size "
                        f"{place.ep}; set expert_model_parallel_size: {ck.ep} or convert the weights again with "
                        f"--ep {place.ep}")
    if list(ck.layers) != list(run_split):
        raise UserError(L.split_refusal(iter_path, run_split, ck.layers))
    return ck.padded_vocab_size


# ---------------------------------------------------------------- the policy


class Checkpointer:
    """This run's checkpoints: where (save_dir, this rank's place), when (every `interval` iterations, the last
    one, and at once on a stop request, within the grace period), what stays (this run's newest `keep`; 0 or
    less: all), whose (run_id, in every manifest: the keep policy and a restart count only this run's), and
    loading the checkpoint to start from."""

    def __init__(self, save_dir: Path, place: RankPlace, *, interval: int, keep: int, run_id: str,
                 source_model: str, distributed_optimizer: bool, stop: StopRequest, grace_period: float,
                 ckpt_format: str = "legacy", async_save: bool = False):
        self.save_dir, self.place = save_dir, place
        # What writes a save's files (ckpt_format); publishing them is the same for both formats.
        if ckpt_format == "torch_dist":
            from ascendfactory.engine.dist_checkpoint import DistWriter

            self.writer = DistWriter(place, async_save)
        else:
            self.writer = LegacyWriter(place, distributed_optimizer)
        self.interval, self.keep, self.run_id = interval, keep, run_id
        self.source_model, self.distributed_optimizer = source_model, distributed_optimizer
        self.stop, self.grace_period = stop, grace_period
        self.protect: int | None = None  # an iteration the keep policy leaves (the best checkpoint so far)
        try:  # fail before training rather than at the first save
            probe_writable(save_dir, ".write_probe")
        except OSError as e:
            raise UserError(f"{save_dir}: not writable ({e.strerror}); checkpoints go to "
                            "<output_dir>/saved_checkpoints, fix its permissions or choose another "
                            "output_dir") from None

    def resume_point(self, own_run_only: bool) -> int | None:
        """Collective: the newest intact checkpoint in save_dir (own_run_only: of this run)."""
        return resume_point(self.save_dir, self.run_id if own_run_only else None)

    def newest(self) -> int | None:
        return newest_valid(self.save_dir) if self.save_dir.is_dir() else None

    def due(self, iteration: int, last: bool, stopping: bool) -> bool:
        return iteration % self.interval == 0 or last or stopping

    def maybe_save(self, state: TrainState, last: bool, stopping: bool) -> bool:
        """Collective. Saves when the policy says so; True when it did."""
        self.writer.finalize(blocking=False)  # publishes an asynchronous save whose files are written
        if not self.due(state.iteration, last, stopping):
            return False
        self.save(state)
        if last or stopping:  # the run ends: its last save is published before the exit
            self.writer.finalize(blocking=True)
        return True

    def preempted(self, iteration: int) -> int:
        """After the save a stop request forced: says so, and returns the exit code that tells the platform."""
        train_log.info(f"stop requested ({self.stop.signal_name or 'by another rank'}): checkpoint iteration "
                       f"{iteration} saved {self.stop.elapsed():.1f}s after the signal (grace period "
                       f"{self.grace_period:.0f}s); exiting with code {EXIT_PREEMPTED}")
        if self.stop.elapsed() > self.grace_period:
            train_log.warning(f"the save finished after the {self.grace_period:.0f}s grace period")
        return EXIT_PREEMPTED

    def save(self, state: TrainState) -> None:
        """Collective over all ranks. Raises UserError (on every rank) when the disk refuses the write. With
        async_save the files are written in the background and published by a later finalize."""
        self.writer.finalize(blocking=True)  # one save at a time: an earlier asynchronous one is published first
        t0 = time.perf_counter()
        save_dir, iteration = self.save_dir, state.iteration
        rank = dist.get_rank()
        tmp = save_dir / f"{TMP_PREFIX}{L.iter_dir_name(iteration)}"
        # Rank 0 looks once; any rank's write error names it.
        found = [newest_valid(save_dir) if rank == 0 else None]
        dist.broadcast_object_list(found, src=0)
        previous = found[0]

        err = None
        if rank == 0:
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():  # left by a crash mid-save: never a checkpoint, only a partial copy
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                err = _save_error(save_dir, iteration, e, previous)
        _agree(err)

        err, sums = None, {}
        try:
            sums = self.writer.write(tmp, state)
        except OSError as e:
            err = _save_error(save_dir, iteration, e, previous, tmp)
        try:
            _agree(err)
        except UserError:
            if rank == 0:  # a partial copy only; the run stops here
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        described = {"consumed_samples": state.consumed,
                     **{k: state.args[k] for k in L.MANIFEST_ARGS if k in state.args}}
        publish = functools.partial(self._complete, tmp, iteration, described, previous, t0)
        if sums is None:  # asynchronous: the writer publishes once megatron-core's writer processes are done
            self.writer.when_written(publish)
            train_log.info(f"checkpoint iteration {iteration}: writing in the background (async_save)")
        else:
            publish(sums)

    def _complete(self, tmp: Path, iteration: int, described: dict, previous: int | None, t0: float,
                  sums: dict[str, int]) -> None:
        """Collective: every rank's files are written (`sums`: this rank's {file: crc32}); manifest, rename,
        tracker, save_total_limit."""
        rank = dist.get_rank()
        kill_point("save_files", iteration, rank)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, sums)
        sums = {k: v for part in every for k, v in part.items()}

        err = None
        if rank == 0:
            try:
                self._publish(tmp, iteration, described, sums)
                kill_point("save_tracker", iteration, rank)
                L.write_tracker(self.save_dir, iteration)
                if self.keep > 0:
                    self._keep_newest()
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                err = _save_error(self.save_dir, iteration, e, previous)
        _agree(err)
        kill_point("after_save", iteration, rank)
        train_log.info(f"saved checkpoint iteration {iteration} to "
                       f"{self.save_dir / L.iter_dir_name(iteration)} in {time.perf_counter() - t0:.2f}s")

    def _publish(self, tmp: Path, iteration: int, described: dict, sums: dict[str, int]) -> None:
        final = self.save_dir / L.iter_dir_name(iteration)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "iteration": iteration,
            **described,
            "tp": self.place.tp,
            "pp": self.place.pp,
            "dp": self.place.dp,
            "ep": self.place.ep,
            "source_model": self.source_model,
            "run_id": self.run_id,
            "files": files,
            "crc32": sums,
        }
        with open(tmp / L.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(d)
        if final.exists():
            # A damaged folder of the same iteration (auto-resume skipped it): kept aside for a person.
            aside = final.with_name(f"{final.name}.replaced-{int(time.time())}")
            os.replace(final, aside)
            log.warning(f"{final} existed and was not loadable; moved to {aside}")
        os.replace(tmp, final)
        fsync_dir(self.save_dir)

    def _keep_newest(self) -> None:
        """Delete this run's complete checkpoints beyond its newest `keep`; damaged folders are left for a person,
        another run's checkpoints (in save_dir before this run) are never counted nor deleted, and neither is the
        `protect` iteration (the best checkpoint, export_checkpoint: best)."""
        save_dir = self.save_dir
        complete = [it for it in L.iterations_on_disk(save_dir)
                    if L.manifest_run_id(save_dir / L.iter_dir_name(it)) == self.run_id
                    and problem_of(save_dir / L.iter_dir_name(it), require_manifest=True) is None]
        for it in (i for i in complete[self.keep:] if i != self.protect):
            shutil.rmtree(save_dir / L.iter_dir_name(it))
            log.info(f"save_total_limit={self.keep}: removed {save_dir / L.iter_dir_name(it)}")

    def load(self, ckpt_dir: Path, iteration: int, state: TrainState, full: bool) -> int | None:
        """Load weights (and with `full` the optimizer, scheduler, RNG) of a checkpoint check_loadable() accepted;
        returns the consumed_train_samples its args record, if any."""
        if L.is_torch_dist(ckpt_dir / L.iter_dir_name(iteration)):
            from ascendfactory.engine import dist_checkpoint

            return dist_checkpoint.load(ckpt_dir / L.iter_dir_name(iteration), self.place, state, full)
        f = self.place.rank_file(ckpt_dir, iteration)
        content, err = None, None
        try:
            content = load_file(f)
        except UserError as e:
            err = str(e)
        _agree(err)  # a rank that stopped alone would leave the others waiting in a collective
        args = content.get("args") or {}
        args = args if isinstance(args, dict) else vars(args)  # Megatron / MindSpeed write an argparse.Namespace
        if full and (problem := moe.resume_problem(args, state.args, ckpt_dir / L.iter_dir_name(iteration))):
            raise UserError(problem)
        weights = moe.experts_as_model(_fit_adapters(content["model"], state.model, full, args, f), state.model)
        missing, unexpected = state.model.load_state_dict(dict(weights), strict=False)
        # Weights only into a LoRA run from a checkpoint without (matching) adapters: they start fresh.
        missing = [k for k in missing if not k.endswith("_extra_state") and (full or not is_lora_key(k))]
        unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise UserError(f"{f}: weights do not fit the model built from config.json "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); convert the weights again")
        if full:
            if problem := resume_problem(content, f):
                raise UserError(problem)
            state.optimizer.load_state_dict(content["optimizer"])
            if self.distributed_optimizer:
                _load_distributed_optimizer_shards(state.optimizer, f.parent / DISTRIB_OPTIM_FILE)
            state.scheduler.load_state_dict(content["opt_param_scheduler"])
            rng = content["rng_state"]
            device.set_rng_state(rng[self.place.dp_rank] if len(rng) == self.place.dp else rng[0])
        else:
            # The fp32 main copy inside the optimizer was taken from the random init: refresh it.
            state.optimizer.reload_model_params()
        return args.get("consumed_train_samples")


# ---------------------------------------------------------------- save and load mechanics


class LegacyWriter:
    """ckpt_format legacy: mp_rank_*/model_optim_rng.pt (+ distrib_optim.pt), written by DP rank 0 of each TP/PP
    (EP) slice; synchronous."""

    def __init__(self, place: RankPlace, distributed_optimizer: bool):
        self.place, self.distributed_optimizer = place, distributed_optimizer

    def write(self, tmp: Path, state: TrainState) -> dict[str, int]:
        """Collective: this rank's files in tmp; returns their {file: crc32}."""
        place = self.place
        rng = [None] * place.dp
        from megatron.core import parallel_state as ps

        dist.all_gather_object(rng, device.rng_state(), group=ps.get_data_parallel_group(with_context_parallel=True))
        sums = {}
        rank_dir = place.rank_dir(tmp)
        rel = str(rank_dir.relative_to(tmp))
        if place.writer:
            rank_dir.mkdir(parents=True, exist_ok=True)
        if self.distributed_optimizer:
            shards = _distributed_optimizer_state(state.optimizer)
            if place.writer:
                sums[f"{rel}/{DISTRIB_OPTIM_FILE}"] = _write_torch(shards, rank_dir / DISTRIB_OPTIM_FILE)
        if place.writer:
            content = {
                "args": {**state.args, "consumed_train_samples": state.consumed, "iteration": state.iteration},
                "checkpoint_version": L.CHECKPOINT_VERSION,
                "iteration": state.iteration,
                "model": moe.experts_as_saved(state.model.state_dict(), state.model),
                "optimizer": state.optimizer.state_dict(),
                "opt_param_scheduler": state.scheduler.state_dict(),
                "rng_state": rng,
            }
            sums[f"{rel}/{L.MODEL_FILE}"] = _write_torch(content, rank_dir / L.MODEL_FILE)
        return sums

    def finalize(self, blocking: bool) -> None:
        """Nothing pending: every save completes in write()."""



def _agree(error: str | None) -> None:
    """Collective: every rank learns whether any rank failed; all raise the first failure."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)


class _Sink:
    """torch.save through Python's write(), so a refused write (disk full, read-only) surfaces as OSError."""

    def __init__(self, f):
        self.f = f
        self.crc = 0  # of everything written, for the manifest: no second read of the file

    def write(self, b) -> int:
        self.crc = zlib.crc32(b, self.crc)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_torch(obj, path: Path) -> int:
    """Returns the crc32 of the file written."""
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return sink.crc


def _distributed_optimizer_state(optimizer):
    """Collective over DP: this (tp, pp) slice's optimizer shards gathered on DP rank 0, in the layout of
    megatron-core's save_parameter_state (a dict, or a list for several chained optimizers). MoE: the expert
    parameters' optimizer gathers on rank 0 of its expert-DP group; the dense one's entry is None but on DP rank 0
    (the file of EP rank 0 carries it)."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [o.get_parameter_state_dp_zero() for o in opts if hasattr(o, "get_parameter_state_dp_zero")]
    return states[0] if len(opts) == 1 else states


def _save_error(save_dir: Path, iteration: int, e: OSError, previous: int | None, path: Path | None = None) -> str:
    prev = f"previous checkpoint iter_{previous:07d} is intact" if previous is not None else "no earlier checkpoint"
    where = e.filename or path or save_dir
    return (f"cannot write checkpoint iteration {iteration} to {save_dir}: {e.strerror or e} ({where}); "
            f"free disk space or make the directory writable ({prev})")


def _fit_adapters(weights: dict, model, full: bool, args: dict, f: Path):
    """The checkpoint's weights as this model takes them. LoRA adapters load as they are when the model has the
    same ones; otherwise (a full fine-tuning run, or other adapter settings) they are folded into the base
    weights, which a resume cannot do: its optimizer state is for the checkpoint's own trainable parameters."""
    ours = {k: v.shape for k, v in model.state_dict().items() if is_lora_key(k)}
    theirs = {k: v.shape for k, v in weights.items() if is_lora_key(k)}
    if ours == theirs:
        return weights
    if full:
        raise UserError(f"{f}: the checkpoint was trained with {_tuning(theirs)}, this run uses {_tuning(ours)}; "
                        "resume with the checkpoint's finetuning_type / lora settings, or use ckpt_load_type 1 to load "
                        "its weights with a fresh optimizer")
    return without_adapters(weights, args, f)


def _tuning(adapter_shapes: dict) -> str:
    if not adapter_shapes:
        return "full fine-tuning"
    rank = next(v[0] for k, v in adapter_shapes.items() if k.endswith(LORA_A))
    return f"LoRA (lora_r {rank} on {', '.join(sorted({k.split('.')[-3] for k in adapter_shapes}))})"


def _load_distributed_optimizer_shards(optimizer, path: Path) -> None:
    """Two megatron-core gaps with torch's Adam (no Apex / TE), whose per-param state holds `step`:
    the dp_zero loader copies every state key but the file carries no `step` (load_state_dict restored it),
    so it is set aside around the load; and load_state_dict gave all params ONE shared step tensor, which
    torch's Adam would then increment once per param each step, so each param gets its own copy."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    # megatron-core's load_parameter_state(path) would torch.load the file unsafely: DP rank 0 reads it here
    # (the layout _distributed_optimizer_state saved) and hands megatron-core the content.
    sharded = [o for o in opts if hasattr(o, "load_parameter_state_from_dp_zero") and not o.is_stub_optimizer]
    content, err = None, None
    # MoE: the dense and the expert optimizers each scatter from rank 0 of their own DP group
    if any(o.data_parallel_group.rank() == 0 for o in sharded):
        try:
            content = load_file(path)
        except UserError as e:
            err = str(e)
    _agree(err)
    states = [content] if len(opts) == 1 else content
    # In fp32 the optimizer's shards are views of the model's own (grad-requiring) parameters.
    with steps_set_aside(optimizer), torch.no_grad():
        for i, o in enumerate(sharded):
            o.load_parameter_state_from_dp_zero(states[i] if content is not None else None)


@contextlib.contextmanager
def steps_set_aside(optimizer):
    """Around megatron-core's loaders of the distributed optimizer's shards (which copy every state key, but the
    shards carry no `step`): torch Adam's per-param `step` set aside, then given back as one copy per param."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = [{p: st.pop("step") for p, st in o.state.items() if "step" in st} for o in inner]
    try:
        yield
    finally:
        for o, saved in zip(inner, steps, strict=True):
            for p, step in saved.items():
                o.state[p]["step"] = step.clone()
