"""torchrun worker of test_dist_read.py / test_convert_reshard.py: megatron-core's own dist_checkpointing on GPTModels
built as the engine builds them (engine/model.py), gloo on CPU.

    python -m torch.distributed.run --nproc_per_node N tests/_dist_worker.py JOBS.json

Jobs (the world size is a multiple of each job's TP x PP x EP; the other ranks are data parallel):
  {"mode": "save", "legacy": DIR, "hf_dir": H, "out": DIR}: the model at the legacy checkpoint's layout, loaded
      from it, saved by dist_checkpointing.save as a training save would (args and iteration in common.pt).
  {"mode": "load", "dist": DIR, "legacy": DIR, "hf_dir": H, "result": JSON}: the model at the legacy
      checkpoint's layout, loaded by dist_checkpointing.load from the torch_dist one; the result says whether
      every weight equals the legacy rank's bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _model(job: dict):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ascendfactory.ckpt.reader import read_checkpoint_layout
    from ascendfactory.engine.model import Parallel, build_gpt_model, transformer_config
    from ascendfactory.modelinfo import read_model_facts

    ck = read_checkpoint_layout(job["legacy"])
    facts = read_model_facts(job["hf_dir"])
    ps.initialize_model_parallel(ck.tp, ck.pp, expert_model_parallel_size=ck.ep, expert_tensor_parallel_size=ck.tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = transformer_config(facts, Parallel(tp=ck.tp, pp=ck.pp, num_layer_list=ck.layers, ep=ck.ep), "fp32",
                             params_dtype=ck.dtype)
    model = build_gpt_model(facts, cfg, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), vocab_size=ck.padded_vocab_size)
    rank = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_expert_model_parallel_rank())
    return ck, model, dict(ck.state(*rank))


def run_job(job: dict) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from ascendfactory.ckpt.files import iter_dir_name, write_tracker
    from ascendfactory.ckpt.reader import rank_args

    ck, model, legacy = _model(job)
    try:
        if job["mode"] == "save":
            result = model.load_state_dict(legacy, strict=False)
            assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result
            out = Path(job["out"]) / iter_dir_name(ck.iteration)
            if dist.get_rank() == 0:
                out.mkdir(parents=True)
            dist.barrier()
            args = rank_args(ck.file(0, 0))
            dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": ck.iteration},
                                    str(out))
            if dist.get_rank() == 0:
                write_tracker(job["out"], ck.iteration)
            return
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(Path(job["dist"]) /
                                         iter_dir_name(1)))
        model.load_state_dict(loaded["model"])
        own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        bad = sorted(k for k in own if k not in legacy or not torch.equal(own[k], legacy[k]))
        flags = [torch.tensor(len(bad))]
        dist.all_reduce(flags[0])
        if dist.get_rank() == 0:
            Path(job["result"]).write_text(json.dumps({"mismatched": int(flags[0]), "example": bad[:3],
                                                       "tensors": len(own), "layout": ck.describe(),
                                                       "world": dist.get_world_size(),
                                                       "tp": ps.get_tensor_model_parallel_world_size()}))
    finally:
        ps.destroy_model_parallel()


if __name__ == "__main__":
    from ascendfactory.convert.verify_worker import run_jobs

    run_jobs(sys.argv[1], run_job)
