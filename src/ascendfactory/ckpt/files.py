"""Megatron checkpoint folders (legacy layout: SPEC.md section 6; torch_dist: section 11, ckpt/dist.py), shared by
the converter and the trainer.

    <dir>/latest_checkpointed_iteration.txt
    <dir>/iter_0000001/mp_rank_{tp:02d}/model_optim_rng.pt            PP = 1
    <dir>/iter_0000001/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt   PP > 1
    <dir>/iter_0000001/mp_rank_{tp:02d}[_{pp:03d}]_{ep:03d}/...       EP > 1 (Megatron-LM's get_checkpoint_name)
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

from ascendfactory.errors import UserError
from ascendfactory.fsutil import write_text_atomic

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
MANIFEST = "manifest.json"  # written by engine/checkpoint.py into every training save; problem_of reads it
DIST_METADATA = "metadata.json"  # megatron-core's marker of a distributed (torch_dist) checkpoint iteration
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a torch_dist checkpoint's shards
CHECKPOINT_VERSION = 3.0
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """mp_rank_{tp:02d}[_{pp:03d}][_{ep:03d}]: the PP part only when PP > 1, the EP part only when EP > 1."""
    pp = f"_{pp_rank:03d}" if pp_size > 1 else ""
    ep = f"_{ep_rank:03d}" if ep_size > 1 else ""
    return f"mp_rank_{tp_rank:02d}{pp}{ep}"


def rank_file(ckpt_dir: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
              ep_size: int = 1) -> Path:
    return (Path(ckpt_dir) / iter_dir_name(iteration) / rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size)
            / MODEL_FILE)


def is_torch_dist(iter_path: str | Path) -> bool:
    """A megatron-core distributed checkpoint (ckpt_format torch_dist), told by content: its metadata.json."""
    return (Path(iter_path) / DIST_METADATA).is_file()


def iterations_on_disk(ckpt_dir: str | Path) -> list[int]:
    """Every iter_XXXXXXX folder name, newest first (complete or not: callers validate)."""
    p = Path(ckpt_dir)
    if not p.is_dir():
        return []
    its = [int(m.group(1)) for d in p.iterdir() if d.is_dir() and (m := _ITER_RE.match(d.name))]
    return sorted(its, reverse=True)


def layout_of(iter_path: str | Path, expert_parallel: bool = False) -> tuple[int, int, int]:
    """(tp, pp, ep) from the mp_rank_* folder names of one iteration folder. A lone 3-digit part is the PP rank,
    or the EP rank when `expert_parallel` (mp_rank_00_001 reads either way: the checkpoint's args tell)."""
    tps, pps, eps = set(), set(), set()
    for d in Path(iter_path).iterdir():
        m = _RANK_RE.match(d.name)
        if m:
            tp, first, second = m.groups()
            if second is None and expert_parallel:
                first, second = None, first
            tps.add(int(tp))
            pps.add(int(first or 0))
            eps.add(int(second or 0))
    if not tps:
        raise UserError(f"{iter_path}: no mp_rank_* folders; not a Megatron checkpoint iteration")
    return max(tps) + 1, max(pps) + 1, max(eps) + 1


def saved_layout(ckpt_dir: str | Path) -> tuple[int, int, int] | None:
    """(TP, PP, EP) of the tracker's iteration of a legacy checkpoint, from its folder names (and its args only
    when a lone folder suffix leaves PP or EP open: torch then); None for a torch_dist one, which loads into any
    layout. UserError naming the tracker or folder when it is not a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    it = read_tracker(ckpt_dir)
    iter_path = ckpt_dir / iter_dir_name(it)
    if not iter_path.is_dir():
        raise UserError(f"{ckpt_dir / TRACKER} names iteration {it}, but {iter_path} does not exist")
    if is_torch_dist(iter_path):
        return None
    expert_parallel = False
    if lone_suffix(iter_path):
        from ascendfactory.ckpt.reader import expert_parallel as is_ep

        expert_parallel = is_ep(iter_path)
    return layout_of(iter_path, expert_parallel=expert_parallel)


def lone_suffix(iter_path: str | Path) -> bool:
    """mp_rank_00_000 without mp_rank_00_000_000: the suffix is a PP rank or an EP rank (layout_of), which only
    the checkpoint's args tell (mgckpt.expert_parallel)."""
    p = Path(iter_path)
    return (p / "mp_rank_00_000").is_dir() and not (p / "mp_rank_00_000_000").is_dir()


def read_tracker(ckpt_dir: str | Path) -> int:
    """The iteration named by the tracker file; UserError naming the file when absent or bad."""
    path = Path(ckpt_dir) / TRACKER
    if not Path(ckpt_dir).is_dir():
        raise UserError(f"{ckpt_dir}: checkpoint directory does not exist")
    if not path.is_file():
        raise UserError(f"{path}: tracker file missing; {ckpt_dir} is not a complete Megatron checkpoint")
    text = path.read_bytes().decode("latin-1").strip()  # any bytes: a binary tracker is damaged, not a crash
    if text == "release":
        raise UserError(f"{path}: 'release' checkpoints are not supported; convert with ascendfactory-cli convert")
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{path}: expected an iteration number, found {text[:40]!a}; the tracker is damaged: "
                        "write the number of a complete iter_* folder into it, or remove it") from None


def write_tracker(ckpt_dir: str | Path, iteration: int) -> None:
    write_text_atomic(Path(ckpt_dir) / TRACKER, str(iteration))


# The args a training checkpoint's manifest repeats, so that `plan` checks an auto-resume without torch
# (config/rules.py): the layers per PP stage and the experts' implementation must be the run's for a full resume.
MANIFEST_ARGS = ("num_layer_list", "moe_grouped_gemm")


def checkpoint_args(tp: int, pp: int, num_layer_list: list[int] | None, source_model: str,
                    architecture: str, vocab_size: int, padded_vocab_size: int, ep: int = 1, num_experts: int = 0,
                    **extra) -> dict:
    """The `args` entry of every checkpoint file we write: the layout and the source, checked on load. The EP
    size is recorded because a lone folder suffix (mp_rank_00_001) is a PP rank or an EP rank (layout_of)."""
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "num_experts": num_experts,
        "num_layer_list": num_layer_list,
        "source_model": source_model,
        "architecture": architecture,
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
        **extra,
    }


def manifest_run_id(iter_path: str | Path) -> str | None:
    """The run that saved this checkpoint (its manifest's run_id); None when unknown (converted weights, a
    checkpoint of another tool or of a version before run ids, a damaged manifest)."""
    try:
        return json.loads((Path(iter_path) / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def problem_of(iter_path: Path, require_manifest: bool, share: tuple[int, int] | None = None) -> str | None:
    """Why this iteration folder cannot be loaded, or None when it is complete. With share=(i, n), the files
    i, i+n, ... (sorted) are also read and compared with their manifest checksums (manifests from before the
    checksums have none: sizes only)."""
    manifest = iter_path / MANIFEST
    if not manifest.is_file():
        if require_manifest:
            return f"{manifest} missing (incomplete checkpoint)"
        if is_torch_dist(iter_path):  # torch_dist: torch's index is written after the shards it lists
            return None if (iter_path / DCP_INDEX).is_file() else f"{iter_path / DCP_INDEX} missing"
        return None if any(iter_path.glob(f"mp_rank_*/{MODEL_FILE}")) else f"no mp_rank_*/{MODEL_FILE}"
    try:
        content = json.loads(manifest.read_text())
        files, sums = content["files"], content.get("crc32", {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} unreadable ({e})"
    for rel, size in files.items():
        p = iter_path / rel
        if not p.is_file():
            return f"{p} missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, manifest says {size}"
    for rel in sorted(sums)[share[0]::share[1]] if share else ():
        if (crc := crc32_of(iter_path / rel)) != sums[rel]:
            return f"{iter_path / rel} content is damaged (crc32 {crc:08x}, manifest says {sums[rel]:08x})"
    return None


def layout_name(tp: int, pp: int, ep: int | None = None) -> str:
    return f"TP{tp} PP{pp}" + (f" EP{ep}" if ep else "")


def legacy_resume_refusal(where: str, ckpt_dir: str | Path, have: tuple[int, int, int], want: tuple[int, int, int],
                          ckpt_format: str) -> str:
    """One line: a full resume (optimizer state) from a legacy checkpoint at `have` (tp, pp, ep) into a run at
    `want` cannot be resharded on load; the `convert reshard` command that makes it loadable."""
    ep_counts = have[2] > 1 or want[2] > 1
    tp, pp, ep = want
    dst = f"{ckpt_dir}_tp{tp}pp{pp}" + (f"ep{ep}" if ep_counts else "")
    cmd = (f"ascendfactory-cli convert reshard --mg-dir {ckpt_dir} --out-dir {dst} --tp {tp} --pp {pp}"
           + (f" --ep {ep}" if ep_counts else "")
           + (" --ckpt-format torch_dist" if ckpt_format == "torch_dist" else ""))
    ours, theirs = (layout_name(t, p, e if ep_counts else None) for t, p, e in (want, have))
    return (f"{where}: checkpoint layout {theirs} differs from the run's {ours}; a legacy checkpoint resumes (with "
            f"its optimizer state) only into its own layout: convert it with `{cmd}` and resume from {dst} "
            f"(ckpt_load_type: 2, user_converted_ckpt_path: {dst}, train_auto_resume: false), or run at {theirs}")


def split_refusal(iter_path: str | Path, ours: Sequence[int], theirs: Sequence[int]) -> str:
    """One line: a legacy checkpoint whose layers split otherwise over the same PP stages (each stage's file numbers
    its own layers from 0) cannot be loaded in full as it is."""
    ours_s, theirs_s = (",".join(map(str, split)) for split in (ours, theirs))
    return (f"num_layer_list: the run splits the layers {ours_s} over its pipeline stages but {iter_path} holds "
            f"{theirs_s}; set num_layer_list: {theirs_s} or convert the weights again with --num-layer-list {ours_s}")


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
