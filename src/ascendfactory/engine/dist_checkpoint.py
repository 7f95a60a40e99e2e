"""ckpt_format: torch_dist (SPEC.md section 11): training saves through megatron-core's dist_checkpointing.

The ranks write the shards of the model and of the optimizer state (the distributed optimizer's in its fully
reshardable form) they hold, one copy of each (megatron-core picks the writer among DP replicas), into the
temporary folder the Checkpointer publishes (manifest, rename, tracker last); the scheduler, iteration, consumed
samples, args and layout go to common.pt, each rank's RNG states to a sharded object. With async_save megatron-core
writes the shards in a forked process and the Checkpointer publishes when they are complete. Loading reads every
pickled part (common.pt, the sharded objects, torch's .metadata index) safely (ckpt/reader.py's loader).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch.distributed as dist

from ascendfactory.ckpt.dist import COMMON_FILE, read_common, read_index
from ascendfactory.ckpt.files import crc32_of, problem_of
from ascendfactory.ckpt.lora import LORA_A, is_lora_key
from ascendfactory.ckpt.reader import load_file, resume_problem
from ascendfactory.engine import device, moe
from ascendfactory.engine.checkpoint import RankPlace, TrainState, _agree, _tuning, steps_set_aside
from ascendfactory.errors import UserError
from ascendfactory.logs import TRAIN

train_log = logging.getLogger(TRAIN)

# Optimizer state that loads into any TP / PP / DP / CP layout (megatron-core gathers it per parameter), keyed by
# parameter name alone: without the chained_<i> prefix EP can change too (megatron-core gives the experts an
# optimizer of their own only at EP > 1).
_OPTIMIZER_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _model_metadata() -> dict:
    from megatron.core import parallel_state as ps

    return {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def _layout(place: RankPlace) -> dict:
    """The ranks a checkpoint's RNG states belong to (DP counts DP x CP replicas, as RankPlace does)."""
    from megatron.core import parallel_state as ps

    return {"tp": place.tp, "pp": place.pp, "dp": place.dp, "cp": ps.get_context_parallel_world_size(),
            "ep": place.ep}


def _rng_object(lay: RankPlace, states):
    """Megatron-LM's layout: one object per TP/PP position holding the states of its DP x CP replicas."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", states, (lay.pp, lay.tp), (lay.pp_rank, lay.tp_rank), replica_id=lay.dp_rank)


def _sharded_state(model, optimizer, lay: RankPlace, loading: bool, rng=None) -> dict:
    model_sd = model.sharded_state_dict(metadata=_model_metadata())
    state = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIMIZER_META)
    if rng is not None:
        state["rng_state"] = _rng_object(lay, rng)
    return state


_MANAGER = []  # the one below, kept alive with this process


def _writer_queue_dies_with_rank() -> None:
    """megatron-core's shard writers report through a multiprocessing Manager that its first save starts (and
    never stops); started here instead, with PR_SET_PDEATHSIG, so that a rank killed with -9 leaves no manager
    process behind (it would also hold torchrun's output pipes open)."""
    import multiprocessing as mp
    import os
    import signal
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from ascendfactory.launch.lock import die_with_parent

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        _MANAGER.append(manager)
        filesystem_async._results_queue = manager.Queue()


class DistWriter:
    """The Checkpointer's writer for ckpt_format torch_dist (see engine/checkpoint.py's LegacyWriter)."""

    def __init__(self, place: RankPlace, async_save: bool):
        self.place = place
        self.queue = None
        self.pending, self.tmp = None, None  # an asynchronous save's request and folder, until when_written
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def write(self, tmp: Path, state: TrainState) -> dict[str, int] | None:
        """Collective: the distributed checkpoint into tmp; returns this rank's share of its files with their
        crc32 (read back after writing: megatron-core's writers offer no hook), or None when the shards are still
        being written (async_save)."""
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps

        lay = self.place
        rng = [None] * lay.dp
        dist.all_gather_object(rng, device.rng_state(), group=ps.get_data_parallel_group(with_context_parallel=True))
        content = _sharded_state(state.model, state.optimizer, lay, loading=False, rng=rng)
        content.update({
            "args": {**state.args, "consumed_train_samples": state.consumed, "iteration": state.iteration},
            "iteration": state.iteration,
            "layout": _layout(lay),
            "distributed_optimizer": _distributed(state.optimizer),
            "optimizers": _count(state.optimizer),
            "opt_param_scheduler": state.scheduler.state_dict(),
        })
        _writer_queue_dies_with_rank()
        # Without async_save it ends with a barrier: every rank's files are complete.
        self.tmp = tmp
        self.pending = dist_checkpointing.save(content, str(tmp), async_sharded_save=self.queue is not None)
        return None if self.pending else _own_share(tmp)

    def when_written(self, publish) -> None:
        """Collective: `publish(this rank's {file: crc32})` runs once megatron-core has finished the files."""
        request, tmp, self.pending = self.pending, self.tmp, None
        request.add_finalize_fn(lambda: publish(_own_share(tmp)))  # after megatron-core's own (metadata.json)
        self.queue.schedule_async_request(request)

    def finalize(self, blocking: bool) -> None:
        """Collective: publishes the asynchronous saves whose files are all written (blocking: waits for them)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=blocking)


def _distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _own_share(tmp: Path) -> dict[str, int]:
    """This rank's share of the written files (each file read by one rank), with their crc32."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    return {str(p.relative_to(tmp)): crc32_of(p) for p in files[dist.get_rank()::dist.get_world_size()]}


class _SafeCommonLoad:
    """megatron-core's common-state loader with the file read by our safe loader instead of torch.load."""

    def __new__(cls):
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

        class Safe(TorchCommonLoadStrategy):
            def load_common(self, checkpoint_dir):
                return load_file(Path(checkpoint_dir) / COMMON_FILE)

        return Safe()


@contextlib.contextmanager
def _safe_sharded_objects(iter_path: Path):
    """torch's distributed-checkpoint planner unpickles sharded objects in full (no weights_only): during our load
    they go through the safe loader (same placement as torch's DefaultLoadPlanner.load_bytes)."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element

    def load_bytes(self, read_item, value):
        fqn = read_item.dest_index.fqn
        obj = load_file(value, name=f"{iter_path} (object {fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    before = MCoreLoadPlanner.__dict__.get("load_bytes")
    MCoreLoadPlanner.load_bytes = load_bytes
    try:
        yield
    finally:
        if before is None:
            del MCoreLoadPlanner.load_bytes
        else:
            MCoreLoadPlanner.load_bytes = before


def _fresh_adam_state(optimizer) -> None:
    """torch's Adam state as its first step creates it (zero moments, step 0): megatron-core's init_state_fn
    leaves out `step`, which its state_dict() requires without Apex / TE before the loaded values replace it."""
    import torch

    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                st = o.optimizer.state[p]
                st.setdefault("step", torch.tensor(0.0))
                st.setdefault("exp_avg", torch.zeros_like(p.data))
                st.setdefault("exp_avg_sq", torch.zeros_like(p.data))


def _load_optimizer(optimizer, state, saved_count: int) -> None:
    """optimizer.load_state_dict, with the distributed optimizer's shards loaded apart: megatron-core's
    fully-reshardable loader copies every state key, `step` included, which torch's Adam (no Apex / TE) holds
    but the shards do not carry. `saved_count`: the optimizers the checkpoint's run chained."""
    import torch

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [state] if len(opts) == 1 else [state[i] for i in range(len(opts))]
    shards = [p.pop("param_state", None) for p in parts]
    kinds = [p.pop("param_state_sharding_type", None) for p in parts]
    if saved_count != len(opts):
        # EP changed: megatron-core keeps the experts' parameters in an optimizer of their own only at EP > 1, so
        # the saved param groups do not map onto this run's. Its own groups (the same config) are kept, with the
        # saved Adam step count; the per-parameter state is in the shards, keyed by parameter name.
        if any(shard is None for shard in shards):
            raise UserError("a torch_dist checkpoint resumes into another expert_model_parallel_size only with "
                            "use_distributed_optimizer: true; set it, or resume at the checkpoint's EP")
        step = next(g["step"] for g in _find(state, "param_groups") if "step" in g)
        kinds = [_find(state, "param_state_sharding_type")] * len(opts)
        own = [o.state_dict() for o in opts]
        for sd in own:
            for group in sd["optimizer"]["param_groups"]:
                group["step"] = step
        state = own[0] if len(opts) == 1 else dict(enumerate(own))
    optimizer.load_state_dict(state)
    with steps_set_aside(optimizer), torch.no_grad():  # fp32: the shards are views of the model's parameters
        for o, shard, kind in zip(opts, shards, kinds, strict=True):
            if shard is None:
                continue
            if kind != _OPTIMIZER_META["distrib_optim_sharding_type"]:
                raise UserError(f"optimizer state saved as {kind!r}: only 'fully_reshardable' (ours) is read; "
                                "use ckpt_load_type 1 for its weights")
            o.load_parameter_state_from_fully_reshardable(shard)


def _find(tree: dict, key: str):
    """The first value of `key` in nested dicts (the saved optimizers' common part)."""
    if key in tree:
        return tree[key]
    for v in tree.values():
        if isinstance(v, dict) and (found := _find(v, key)) is not None:
            return found
    return None


def _count(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def load(iter_path: Path, lay: RankPlace, state: TrainState, full: bool) -> int | None:
    """Collective: weights (and with `full` the optimizer, scheduler, RNG) of a torch_dist checkpoint, resharded
    by megatron-core into this run's layout; returns the consumed samples its args record."""
    from megatron.core import dist_checkpointing

    common, err = None, None
    try:
        common = read_common(iter_path)
        if full:
            err = (resume_problem({**common, "optimizer": None, "rng_state": None}, iter_path)
                   or moe.resume_problem(common.get("args") or {}, state.args, iter_path))
    except UserError as e:
        err = str(e)
    _agree(err)
    args = common.get("args") or {}
    saved, ours = common.get("layout") or {}, _layout(lay)
    # RNG states are per rank: they carry over only to the same ranks.
    same_ranks = all(saved.get(k, 1) == v for k, v in ours.items())
    if full:
        _fresh_adam_state(state.optimizer)
    content = _sharded_state(state.model, state.optimizer if full else None, lay, loading=True,
                             rng=[None] * lay.dp if full and same_ranks else None)
    fresh = _fit_adapters(content["model"], iter_path, full)
    for k in fresh:
        del content["model"][k]
    with _safe_sharded_objects(iter_path):
        loaded = dist_checkpointing.load(content, str(iter_path), common_strategy=_SafeCommonLoad())
    state.model.load_state_dict(loaded["model"], strict=not fresh)
    if full:
        _load_optimizer(state.optimizer, loaded["optimizer"], common.get("optimizers", _count(state.optimizer)))
        state.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        if same_ranks:
            device.set_rng_state(loaded["rng_state"][lay.dp_rank])
        else:
            name = " ".join(f"{k.upper()}{saved.get(k, '?')}" for k in ours)
            train_log.info(f"RNG: the checkpoint's ranks ({name}) differ from the run's "
                           f"({' '.join(f'{k.upper()}{v}' for k, v in ours.items())}); RNG states re-seeded from seed")
    else:
        state.optimizer.reload_model_params()
    return args.get("consumed_train_samples")


def _fit_adapters(model_sd: dict, iter_path: Path, full: bool) -> list[str]:
    """The model's LoRA adapter keys to leave out of the load (start fresh): all of them, weights only from a
    checkpoint without adapters; none when the checkpoint holds the model's own (they load as they are). Other
    adapters: UserError (a resume's optimizer state is for the checkpoint's trainable parameters; folding them into
    the base weights is done on legacy checkpoints only)."""
    ours = {sh.key: (sh.data.shape[0],) for k, sh in model_sd.items() if k.endswith("." + LORA_A)}
    theirs = {k: (md.size[-2],) for k, md in read_index(iter_path).state_dict_metadata.items()
              if k.startswith("decoder.") and k.endswith("." + LORA_A)}  # not the optimizer state's
    if ours == theirs:
        return []
    if not theirs and not full:
        return [k for k in model_sd if is_lora_key(k)]
    what = f"{iter_path}: the checkpoint was trained with {_tuning(theirs)}, this run uses {_tuning(ours)}; "
    if full:
        raise UserError(what + "resume with the checkpoint's finetuning_type / lora settings, or use ckpt_load_type "
                        "1 to load its weights with a fresh optimizer")
    raise UserError(what + "a torch_dist checkpoint's adapters load only into a run with the same ones: set the "
                    "checkpoint's finetuning_type / lora settings, or export it with `ascendfactory-cli convert "
                    "mg2hf` (adapters folded in) and start from that")


def check_loadable(iter_path: Path, require_manifest: bool) -> int:
    """The checkpoint is complete (any layout: megatron-core reshards it); returns its padded vocabulary size,
    read before the model is built. UserError otherwise."""
    if problem := problem_of(iter_path, require_manifest):
        raise UserError(f"{iter_path}: cannot load ({problem}); pick another checkpoint")
    read_index(iter_path)  # torch would unpickle it in full: read safely first, so a crafted one is refused
    padded = (read_common(iter_path).get("args") or {}).get("padded_vocab_size")
    if not padded:
        raise UserError(f"{iter_path / COMMON_FILE}: no padded_vocab_size in its args; not a checkpoint of ours")
    return int(padded)
