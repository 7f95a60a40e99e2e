"""Reading Megatron checkpoints (ours, training saves, MindSpeed-LLM's): layout, source, rank state dicts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ascendfactory.ckpt.files import iter_dir_name, layout_of, rank_file, read_tracker
from ascendfactory.ckpt.lora import without_adapters
from ascendfactory.errors import UserError

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class CheckpointLayout:
    """What a Megatron checkpoint folder holds; `layers` is read from the tensors, the rest from `args`."""

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

    def file(self, tp_rank: int, pp_rank: int) -> Path:
        return rank_file(self.path, self.iteration, tp_rank, pp_rank, self.pp)

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp} layers {list(self.layers)}"


def load_rank(path: Path) -> dict:
    """A rank file's full content, memory-mapped: tensors are read only when touched (optimizer state never)."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files from torch.save(_use_new_zipfile_serialization=False) cannot be mapped: read them whole
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors: the file is damaged
        raise UserError(f"{path}: unreadable checkpoint file ({type(e).__name__}: {e})") from None


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
    tp, pp, _ = layout_of(it_dir)
    for p in range(pp):
        for t in range(tp):
            f = rank_file(mg_dir, it, t, p, pp)
            if not f.is_file():
                raise UserError(f"{f}: rank file missing; the checkpoint is incomplete (TP{tp} PP{pp} expected)")
    layers, args, emb = [], {}, None
    for p in range(pp):
        ckpt = load_rank(rank_file(mg_dir, it, 0, p, pp))
        if p == 0:
            args = _args_dict(ckpt.get("args"))
        sd = ckpt.get("model") or {}
        layers.append(len({m.group(1) for k in sd if (m := _LAYER_RE.match(k))}))
        emb = sd.get("embedding.word_embeddings.weight", emb)
    if emb is None:
        raise UserError(f"{it_dir}: no embedding.word_embeddings.weight in the first stage; not a GPT checkpoint")
    recorded_tp = args.get("tensor_model_parallel_size", tp)
    recorded_pp = args.get("pipeline_model_parallel_size", pp)
    if (recorded_tp, recorded_pp) != (tp, pp):
        raise UserError(f"{it_dir}: folders say TP{tp} PP{pp} but the checkpoint args say "
                        f"TP{recorded_tp} PP{recorded_pp}; the checkpoint is damaged")
    return CheckpointLayout(
        path=mg_dir, iteration=it, tp=tp, pp=pp, layers=tuple(layers), source_model=args.get("source_model"),
        architecture=args.get("architecture"), vocab_size=args.get("vocab_size"),
        padded_vocab_size=int(args.get("padded_vocab_size") or emb.shape[0] * tp), dtype=emb.dtype,
    )
