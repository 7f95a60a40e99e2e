"""Full reshard of a training checkpoint (weights, optimizer, scheduler, iteration, consumed samples, RNG) into
another layout or format: what `convert reshard` runs for checkpoints that hold optimizer state.

The engine itself does it, on CPU / gloo under torchrun: one run at the source checkpoint's layout (DP 1; with EP,
DP = EP) loads the full state as a resume would and saves it with the Checkpointer. A torch_dist target takes that
one run (any layout resumes it); a legacy target at another TP / PP / EP goes through a torch_dist intermediate and
a second run at the target layout, which megatron-core reshards into. No data is read and no step is taken.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ascendfactory.ckpt import files as L
from ascendfactory.errors import UserError


def reshard_full(src: Path, dst: Path, tp: int, pp: int, ep: int, ckpt_format: str,
                 model_dir: Path | None = None, num_layer_list: list[int] | None = None) -> None:
    """`src`'s newest checkpoint (its tracker's) into `dst` at TP `tp`, PP `pp`, EP `ep`, format `ckpt_format`
    (legacy | torch_dist). `model_dir`: the HF model folder the checkpoint was trained from (its config.json
    builds the model); default: the source_model its args record. `num_layer_list`: the legacy target's layers
    per PP stage (default: the source's where its PP is kept, else an even split). UserError (exit 2) on bad
    input; a failed run raises UserError with its last error line."""
    src, dst = Path(src), Path(dst)
    args, distributed = _checkpoint_args(src)
    model = Path(model_dir or args.get("source_model") or "")
    if not (model / "config.json").is_file():
        raise UserError(f"{model}/config.json: the model the checkpoint {src} was trained from is needed to build "
                        "it; pass its HF folder (model_dir)")
    if args.get("lora_r"):
        raise UserError(f"{src}: a LoRA checkpoint; reshard the merged weights (ckpt_load_type 1) instead")
    source = (int(args["tensor_model_parallel_size"]), int(args["pipeline_model_parallel_size"]),
              int(args.get("expert_model_parallel_size") or 1))
    it_dir = src / L.iter_dir_name(L.read_tracker(src))
    with tempfile.TemporaryDirectory(prefix="reshard_") as work:
        work = Path(work)
        if ckpt_format == "torch_dist":  # one run at the source layout: any layout resumes the result
            _run(src, dst, source, "torch_dist", args, model, distributed, work / "run", None)
        elif L.is_torch_dist(it_dir):  # one run at the target layout: megatron-core reshards on load
            _run(src, dst, (tp, pp, ep), "legacy", args, model, distributed, work / "run", num_layer_list)
        else:
            mid = work / "torch_dist"
            _run(src, mid, source, "torch_dist", args, model, distributed, work / "run1", None)
            _run(mid, dst, (tp, pp, ep), "legacy", args, model, distributed, work / "run2", num_layer_list)


def _checkpoint_args(src: Path) -> tuple[dict, bool]:
    """The args the checkpoint's run recorded, and whether it used the distributed optimizer (whose state
    loads only into one)."""
    from ascendfactory.ckpt.dist import read_common
    from ascendfactory.ckpt.reader import rank_args, read_checkpoint_layout

    it_dir = src / L.iter_dir_name(L.read_tracker(src))
    if L.is_torch_dist(it_dir):
        common = read_common(it_dir)
        return common.get("args") or {}, bool(common.get("distributed_optimizer"))
    ck = read_checkpoint_layout(src)
    return rank_args(ck.file(0, 0)), any(it_dir.glob("mp_rank_*/distrib_optim.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(src: Path, dst: Path, layout: tuple[int, int, int], ckpt_format: str, args: dict, model: Path,
         distributed: bool, work: Path, layers: list[int] | None) -> None:
    """One engine run: load `src` in full at `layout` (`layers` per PP stage when given), save it into `dst` as
    `ckpt_format`."""
    tp, pp, ep = layout
    world = tp * pp * ep  # DP 1; EP splits the DP ranks, so EP needs EP of them
    if not layers and args.get("num_layer_list") and pp == args.get("pipeline_model_parallel_size"):
        layers = args["num_layer_list"]  # the source's own split where its PP is kept
    work.mkdir(parents=True)
    cfg = {
        "model_name_or_path": str(model), "output_dir": str(work), "processed_data_dir": str(work),
        "stage": args.get("stage") or "pt", "ckpt_load_type": 2, "user_converted_ckpt_path": str(src),
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep,
        # megatron-core maps layers by their global number, so any split loads
        "num_layer_list": ",".join(map(str, layers)) if layers else None,
        "sequence_parallel": tp > 1 and bool(args.get("num_experts")),
        "seq_len": int(args.get("seq_length") or 1), "micro_batch_size": int(args.get("micro_batch_size") or 1),
        "global_batch_size": int(args.get("global_batch_size") or ep),  # a multiple of the source's DP, so of EP
        "train_iters": int(args.get("train_iters") or 1), "seed": int(args.get("seed") or 1234),
        "device": "cpu", "use_distributed_optimizer": distributed, "ckpt_format": ckpt_format,
        "convert_mg2hf_at_last": False,
        # the experts' implementation its optimizer state is for (GroupedMLP computes in bf16 only)
        **({"moe_grouped_gemm": True, "precision": "bf16"} if args.get("moe_grouped_gemm") else {}),
    }
    config = work / "exp-config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(_free_port()), "-m", "ascendfactory.engine", "--config", str(config), "--reshard-to", str(dst)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        raise UserError(f"reshard of {src} at TP{tp} PP{pp} EP{ep} failed: "
                        f"{errors[0][7:] if errors else (res.stderr.strip().splitlines() or ['?'])[-1]}")
