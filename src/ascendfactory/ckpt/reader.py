"""Reading Megatron checkpoints (ours, training saves, MindSpeed-LLM's): layout, source, rank state dicts."""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ascendfactory.ckpt.files import (
    MODEL_FILE,
    is_torch_dist,
    iter_dir_name,
    layout_of,
    lone_suffix,
    rank_file,
    read_tracker,
)
from ascendfactory.ckpt.lora import without_adapters
from ascendfactory.errors import UserError

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CheckpointLayout:
    """What a Megatron checkpoint folder holds; `layers` is read from the tensors, the rest from `args`.
    A torch_dist checkpoint reads as one TP1 PP1 EP1 rank (its global tensors); `saved` is the layout it was
    saved at (TP, PP, EP, from its args)."""

    path: Path
    iteration: int
    tp: int
    pp: int
    layers: tuple[int, ...]  # decoder layers per PP stage
    source_model: str | None
    architecture: str | None
    vocab_size: int | None
    padded_vocab_size: int
    dtype: torch.dtype
    ep: int = 1
    format: str = "legacy"  # or "torch_dist"
    saved: tuple[int, int, int] | None = None  # torch_dist: (TP, PP, EP) it was saved at
    recorded_args: dict = field(default_factory=dict, repr=False, compare=False)  # as read for the layout

    def file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        """The rank's file; a torch_dist checkpoint's iteration folder (its one rank)."""
        if self.format == "torch_dist":
            return self.path / iter_dir_name(self.iteration)
        return rank_file(self.path, self.iteration, tp_rank, pp_rank, self.pp, ep_rank, self.ep)

    def state(self, tp_rank: int, pp_rank: int, ep_rank: int = 0, fold_adapters: bool = True
              ) -> Mapping[str, torch.Tensor]:
        """model_state of one rank; of a torch_dist checkpoint its global tensors, read when accessed."""
        if self.format != "torch_dist":
            return model_state(self.file(tp_rank, pp_rank, ep_rank), fold_adapters)
        from ascendfactory.ckpt.dist import DistIndex, DistState

        state = DistState(DistIndex(self.file(0, 0)))
        return without_adapters(state, self.args(), self.file(0, 0)) if fold_adapters else state

    def resume_problem(self) -> str | None:
        """Why it cannot be resumed from (ckpt_load_type 2), e.g. converted weights: no training state."""
        if self.format != "torch_dist":
            return resume_problem(load_rank(self.file(0, 0)), self.file(0, 0))
        from ascendfactory.ckpt.dist import read_common, read_index

        # the optimizer and RNG states are sharded (in the index), the scheduler in common.pt
        sharded = {k.split(".")[0].split("/")[0] for k in read_index(self.file(0, 0)).state_dict_metadata}
        return resume_problem({**read_common(self.file(0, 0)), **dict.fromkeys(sharded)}, self.file(0, 0))

    def args(self) -> dict:
        """The args the checkpoint records (its first rank file's; a torch_dist one's common.pt), read once with
        the layout."""
        return dict(self.recorded_args)

    def describe(self) -> str:
        if self.saved:
            tp, pp, ep = self.saved
            return f"torch_dist saved at TP{tp} PP{pp}{f' EP{ep}' if ep > 1 else ''}, layers {sum(self.layers)}"
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        return f"TP{self.tp} PP{self.pp}{ep} layers {list(self.layers)}"


_trusted = False


def trust_checkpoints(on: bool) -> None:
    """trust_checkpoint: true / --trust-checkpoint: checkpoint files are unpickled in full, which runs any code
    they carry. Off by default: only tensors, containers and the types of _allowed_globals() are rebuilt."""
    global _trusted
    _trusted = on


def trusting() -> bool:
    return _trusted


# megatron-core's enum in Megatron / MindSpeed-LLM args: importing megatron-core takes seconds, so it is imported
# (and allowed) only for a file that holds it
_MEGATRON_ENUM = "megatron.core.transformer.enums.AttnBackend"


@functools.cache
def _allowed_globals(megatron: bool) -> tuple:
    """Exactly what checkpoints need beyond torch's own tensors: our training saves' numpy RNG state, and the
    argparse.Namespace of Megatron / MindSpeed-LLM args with (megatron) megatron-core's AttnBackend enum in it."""
    import argparse
    import warnings

    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 renamed np.core
    allowed = (argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct)
    if not megatron:
        return allowed
    with warnings.catch_warnings():  # megatron-core's import-time notices (no TE / Apex) are not ours to print
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.transformer.enums import AttnBackend

    return allowed + (AttnBackend,)


@contextlib.contextmanager
def _only_allowed_globals(megatron: bool):
    """torch's allow-list is process-wide and megatron-core adds to it at import (BytesIO, PosixPath, its
    configs...): during our load it holds ours alone."""
    ser = torch.serialization
    before = ser.get_safe_globals()
    ser.clear_safe_globals()
    ser.add_safe_globals(list(_allowed_globals(megatron)))
    try:
        yield
    finally:
        ser.clear_safe_globals()
        ser.add_safe_globals(before)


_REFUSED_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_file(path, mmap: bool = False, megatron: bool = False, name: str | None = None):
    """A checkpoint file's content, unpickled safely (weights_only + the allow-list) unless trust_checkpoints()
    is on; UserError naming the file for a refused type or a damaged file. `path` may be an open binary file
    (megatron-core's distributed checkpoints hand over their objects so), then named `name` in errors."""
    kw = {"map_location": "cpu", "mmap": mmap}
    src = path if hasattr(path, "read") else str(path)
    try:
        if _trusted:
            return torch.load(src, weights_only=False, **kw)  # trust_checkpoint: the user vouched for it
        if not hasattr(torch.serialization, "add_safe_globals"):  # torch < 2.4: only torch's built-in list
            return torch.load(src, weights_only=True, **kw)
        with _only_allowed_globals(megatron):
            return torch.load(src, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        path = name or path
        if refused := _REFUSED_RE.search(str(e)):
            if refused.group(1) == _MEGATRON_ENUM and not megatron:
                if hasattr(src, "seek"):
                    src.seek(0)
                return load_file(src, mmap, megatron=True, name=name)
            old = ("" if hasattr(torch.serialization, "add_safe_globals") else
                   f" (torch {torch.__version__} cannot allow Megatron args or RNG states; torch >= 2.4 can)")
            raise UserError(
                f"{path}: refused to load type {refused.group(1)}: unpickling it could run code from the file"
                f"{old}; only if you trust whoever wrote it, set trust_checkpoint: true (convert mg2hf: "
                "--trust-checkpoint)") from None
        raise _damaged(path, e) from None
    except RuntimeError as e:
        if mmap and "mmap" in str(e):
            raise  # the caller reads it whole
        raise _damaged(name or path, e) from None
    except Exception as e:  # truncated zip, pickle errors: the file is damaged
        raise _damaged(name or path, e) from None


def _damaged(path: Path, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return UserError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {first})")


def load_rank(path: Path) -> dict:
    """A rank file's full content, memory-mapped: tensors are read only when touched (optimizer state never)."""
    try:
        return load_file(path, mmap=True)
    except RuntimeError:
        # files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped: read them whole
        return load_file(path)


def model_state(path: Path, fold_adapters: bool = True) -> Mapping[str, torch.Tensor]:
    """The weights of a rank file without megatron's `_extra_state` entries; LoRA adapters folded into their base
    weights (as a plain model holds them), or with fold_adapters=False left as they are."""
    ckpt = load_rank(path)
    if "model" not in ckpt:
        found = ", ".join(sorted(k for k in ckpt if k.startswith("model"))) or "none"
        raise UserError(f"{path}: no 'model' entry (found: {found}); virtual-pipeline checkpoints are not supported")
    state = {k: v for k, v in ckpt["model"].items() if not k.endswith("_extra_state")}
    return without_adapters(state, _args_dict(ckpt.get("args")), path) if fold_adapters else state


TRAINING_STATE = ("optimizer", "opt_param_scheduler", "rng_state")


def resume_problem(rank_content: Mapping, path) -> str | None:
    """Why a rank file cannot be resumed from (ckpt_load_type 2): converted weights carry no training state."""
    missing = [k for k in TRAINING_STATE if k not in rank_content]
    if missing:
        return (f"{path}: no {missing[0]!r} (weights only, e.g. converted HF weights); "
                "use ckpt_load_type 1 for such a checkpoint")
    return None


def rank_args(path: Path) -> dict:
    """The `args` a rank file records (Megatron / MindSpeed write an argparse.Namespace, we a dict)."""
    return _args_dict(load_rank(path).get("args"))


def _args_dict(args) -> dict:
    if args is None:
        return {}
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def read_checkpoint_layout(mg_dir: str | Path, iteration: int | None = None) -> CheckpointLayout:
    """Layout + source of a Megatron checkpoint; UserError when the tracker or any rank file is missing."""
    mg_dir = Path(mg_dir)
    it = read_tracker(mg_dir) if iteration is None else iteration
    it_dir = mg_dir / iter_dir_name(it)
    if not it_dir.is_dir():
        raise UserError(f"{it_dir}: iteration folder missing; pick an iteration that exists in {mg_dir}")
    if is_torch_dist(it_dir):
        return _dist_layout(mg_dir, it)
    tp, pp, ep = layout_of(it_dir, expert_parallel=expert_parallel(it_dir))
    for p in range(pp):
        for t in range(tp):
            for e in range(ep):
                f = rank_file(mg_dir, it, t, p, pp, e, ep)
                if not f.is_file():
                    raise UserError(f"{f}: rank file missing; the checkpoint is incomplete (TP{tp} PP{pp}"
                                    f"{f' EP{ep}' if ep > 1 else ''} expected)")
    layers, args, emb = [], {}, None
    for p in range(pp):
        ckpt = load_rank(rank_file(mg_dir, it, 0, p, pp, 0, ep))
        if p == 0:
            args = _args_dict(ckpt.get("args"))
        sd = ckpt.get("model") or {}
        layers.append(len({m.group(1) for k in sd if (m := _LAYER_RE.match(k))}))
        emb = sd.get("embedding.word_embeddings.weight", emb)
    if emb is None:
        raise UserError(f"{it_dir}: no embedding.word_embeddings.weight in the first stage; not a GPT checkpoint")
    recorded_tp = args.get("tensor_model_parallel_size", tp)
    recorded_pp = args.get("pipeline_model_parallel_size", pp)
    recorded_ep = args.get("expert_model_parallel_size") or 1
    if (recorded_tp, recorded_pp, recorded_ep) != (tp, pp, ep):
        raise UserError(f"{it_dir}: folders say TP{tp} PP{pp} EP{ep} but the checkpoint args say "
                        f"TP{recorded_tp} PP{recorded_pp} EP{recorded_ep}; the checkpoint is damaged")
    return CheckpointLayout(
        path=mg_dir, iteration=it, tp=tp, pp=pp, layers=tuple(layers), source_model=args.get("source_model"),
        architecture=args.get("architecture"), vocab_size=args.get("vocab_size"),
        padded_vocab_size=int(args.get("padded_vocab_size") or emb.shape[0] * tp), dtype=emb.dtype, ep=ep,
        recorded_args=args,
    )


def _dist_layout(mg_dir: Path, it: int) -> CheckpointLayout:
    from ascendfactory.ckpt.dist import COMMON_FILE, DistIndex, DistState, read_common

    it_dir = mg_dir / iter_dir_name(it)
    args = _args_dict(read_common(it_dir).get("args"))
    state = DistState(DistIndex(it_dir))
    emb = "embedding.word_embeddings.weight"
    if emb not in state:
        raise UserError(f"{it_dir}: no {emb} among its tensors; not a GPT checkpoint")
    rows = state.index.size(emb)[0]
    saved = tuple(int(args.get(k) or 1) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                    "expert_model_parallel_size"))
    if args.get("padded_vocab_size") not in (None, rows):
        raise UserError(f"{it_dir / COMMON_FILE}: args say padded_vocab_size {args['padded_vocab_size']} but the "
                        f"embedding has {rows} rows; the checkpoint is damaged")
    return CheckpointLayout(
        path=mg_dir, iteration=it, tp=1, pp=1, layers=(state.num_layers(),), source_model=args.get("source_model"),
        architecture=args.get("architecture"), vocab_size=args.get("vocab_size"), padded_vocab_size=rows,
        dtype=state.index.dtype(emb), format="torch_dist", saved=saved, recorded_args=args)


def expert_parallel(it_dir: str | Path) -> bool:
    """Whether a lone folder suffix (mp_rank_00_001) is an EP rank: the args of mp_rank_00_000 say (their
    expert_model_parallel_size), read only when the folder names leave it open."""
    first = Path(it_dir) / "mp_rank_00_000" / MODEL_FILE
    if not lone_suffix(it_dir) or not first.is_file():
        return False
    return int(rank_args(first).get("expert_model_parallel_size") or 1) > 1
