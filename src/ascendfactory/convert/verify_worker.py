"""torchrun entry of `--verify`: load converted checkpoints into megatron-core GPTModels at their TP/PP
and compare their logits with the HF reference logits computed by verify.py.

    python -m torch.distributed.run --nproc_per_node N -m ascendfactory.convert.verify_worker JOBS.json

Each job: {"mg_dir", "hf_dir", "iteration", "dtype" (weights rounded to it, as in the reference),
"reference" (a torch file: tokens, logits), "result" (json out)}.
Several jobs share one launch (process start and imports dominate on small models); the world size
must be a multiple of each job's TP*PP*EP (the rest is data parallel, computing the same thing; EP ranks are
data-parallel ranks that hold different experts).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def _load_strict(model, state: dict, where, dtype) -> None:
    result = model.load_state_dict({k: v.to(dtype).float() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{where}: state dict does not fit the model: missing {missing}, unexpected {unexpected}")


def run_job(job: dict) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ascendfactory.ckpt.lora import has_adapters
    from ascendfactory.ckpt.reader import read_checkpoint_layout, trust_checkpoints
    from ascendfactory.convert.options import torch_dtype
    from ascendfactory.engine.lora import LoRASpec, apply_lora
    from ascendfactory.engine.model import Parallel, build_gpt_model, transformer_config
    from ascendfactory.modelinfo import read_model_facts

    trust_checkpoints(job.get("trust_checkpoint", False))
    ck = read_checkpoint_layout(job["mg_dir"], job.get("iteration"))
    facts = read_model_facts(job["hf_dir"])
    ps.initialize_model_parallel(ck.tp, ck.pp, expert_model_parallel_size=ck.ep)
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        first, last = pp_rank == 0, pp_rank == ck.pp - 1
        cfg = transformer_config(facts, Parallel(tp=ck.tp, pp=ck.pp, num_layer_list=ck.layers, ep=ck.ep), "fp32")
        model = build_gpt_model(facts, cfg, pre_process=first, post_process=last,
                                vocab_size=ck.padded_vocab_size)
        dtype = torch_dtype(job.get("dtype"), torch.float32)
        rank = (tp_rank, pp_rank, ps.get_expert_model_parallel_rank())
        f = ck.file(*rank)
        state = dict(ck.state(*rank, fold_adapters=False))  # a torch_dist checkpoint's: one TP1 PP1 rank
        if has_adapters(state):
            # The trained model as it ran (adapters beside frozen weights): checks the HF side's merged weights.
            apply_lora(model, LoRASpec.from_args(ck.args()), 0, ck.tp, tp_rank)
        _load_strict(model, state, f, dtype)
        model.eval()
        ref = torch.load(job["reference"], weights_only=True)  # verify.py's tokens and logits: tensors only
        tokens = ref["tokens"]
        b, s = tokens.shape
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        with torch.no_grad():
            if not first:
                hidden = torch.empty(s, b, facts.hidden_size)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(tokens, position_ids, mask)
            if not last:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                return
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)[..., : facts.vocab_size]
        if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
            diff = (logits.float() - ref["logits"].float()).abs().max().item()
            with open(job["result"], "w") as f:
                json.dump({"max_abs_diff": diff, "layout": ck.describe()}, f)
    finally:
        ps.destroy_model_parallel()


def run_jobs(jobs_file: str, run) -> None:
    """Under torchrun on the CPU (gloo): `run` each job of the JSON list in jobs_file, all ranks in step."""
    from ascendfactory.engine import device

    device.setup("cpu")
    dist.init_process_group("gloo")
    try:
        with open(jobs_file) as f:
            jobs = json.load(f)
        for job in jobs:
            run(job)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_jobs(sys.argv[1], run_job)
