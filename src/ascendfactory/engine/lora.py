"""LoRA (finetuning_type: lora) on megatron-core's tensor-parallel linears.

Each target linear gets two children, lora_A [r, in] and lora_B [out, r], and a forward hook that adds
(lora_alpha / lora_r) * B A dropout(x) to its output; every other parameter is frozen. The base weights keep their
names, so converted checkpoints load as they are and a saved checkpoint folds back into plain weights
(ckpt/lora.py). The adapters are split like their linear: a column-parallel linear (linear_qkv, linear_fc1)
splits B's rows over TP and keeps A whole, a row-parallel one (linear_proj, linear_fc2) splits A's columns and
keeps B whole, and the few-column middle product takes megatron-core's own TP / sequence-parallel collectives.
A starts from a generator seeded by (seed, layer, linear) and is cut from the full matrix, B from zeros, so
the start is the base model and every TP / PP layout trains the same adapters. For ckpt_format torch_dist each
linear's sharded_state_dict shards its adapters as its weight (TP axis, layer / expert offsets, gate and up of a
gated linear_fc1 apart), so the saved global adapters are the same in every layout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ascendfactory.ckpt.lora import LORA_A, LORA_B
from ascendfactory.config.schema import LORA_TARGETS


@dataclass(frozen=True)
class LoRASpec:
    r: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_args(cls, args: dict) -> LoRASpec:
        return cls(int(args["lora_r"]), float(args["lora_alpha"]), tuple(args["lora_target_modules"]),
                   float(args.get("lora_dropout", 0.0)))

    def checkpoint_args(self) -> dict:
        return {"finetuning_type": "lora", "lora_r": self.r, "lora_alpha": self.alpha,
                "lora_target_modules": list(self.targets), "lora_dropout": self.dropout}


def _initial_a(r: int, fan_in: int, seed: int, layer_number: int, name: str) -> torch.Tensor:
    """nn.Linear's default init (what PEFT gives A), from a generator of its own: the same full matrix on every
    rank and in every layout."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer_number}/{name}".encode()))
    a = torch.empty(r, fan_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight)
    return lin


def _dropped(module, x: torch.Tensor, own_slice: bool) -> torch.Tensor:
    """Dropout on the adapter's input. An input every TP rank holds whole takes the default generator (seeded alike
    on the TP ranks: the same mask, so the replicated A gets the same gradient); a rank's own slice (hidden columns,
    or the sequence under SP) takes megatron-core's model-parallel generator, as its own dropout does."""
    p = module.lora_dropout
    if not (p and module.training):
        return x
    if own_slice:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, p, True)
    return torch.nn.functional.dropout(x, p, True)


def _column_hook(module, args, output):
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    a = module.lora_A(_dropped(module, args[0], own_slice=module.sequence_parallel))
    # B's TP shards all need the whole A x: gathered over the sequence under SP, else already replicated
    # (the backward then sums the shards' gradients either way).
    a = gather_from_sequence_parallel_region(a) if module.sequence_parallel else copy_to_tensor_model_parallel_region(a)
    out, bias = output
    return out + module.lora_scaling * module.lora_B(a), bias


def _row_hook(module, args, output):
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    # this rank's input columns: a partial sum, completed like the base output
    a = module.lora_A(_dropped(module, args[0], own_slice=True))
    a = (reduce_scatter_to_sequence_parallel_region(a) if module.sequence_parallel
         else reduce_from_tensor_model_parallel_region(a))
    out, bias = output
    return out + module.lora_scaling * module.lora_B(a), bias


def _attach(linear, spec: LoRASpec, seed: int, layer_number: int, name: str, tp: int, tp_rank: int) -> None:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    base = linear.weight
    a = _initial_a(spec.r, linear.input_size, seed, layer_number, name)
    if isinstance(linear, ColumnParallelLinear):
        b = torch.zeros(linear.output_size_per_partition, spec.r)
        hook = _column_hook
    elif isinstance(linear, RowParallelLinear):
        a = a.chunk(tp, dim=1)[tp_rank].contiguous()
        b = torch.zeros(linear.output_size, spec.r)
        hook = _row_hook
    else:
        raise TypeError(f"{name}: {type(linear).__name__} is not a megatron-core parallel linear")
    linear.lora_A = _linear(a.to(base.device, base.dtype))
    linear.lora_B = _linear(b.to(base.device, base.dtype))
    column = hook is _column_hook
    split, whole = (linear.lora_B, linear.lora_A) if column else (linear.lora_A, linear.lora_B)
    set_tensor_model_parallel_attributes(split.weight, True, 0 if column else 1, 1)
    # The whole matrix sees only this rank's part of the sequence under SP: megatron-core sums its gradient
    # over TP, as for the norms.
    whole.weight.sequence_parallel = linear.sequence_parallel
    # An expert's adapters are the expert's own (EP ranks hold different experts): megatron-core's DDP reduces their
    # gradients over the expert-DP group, as the expert's weight.
    linear.lora_A.weight.allreduce = linear.lora_B.weight.allreduce = getattr(base, "allreduce", True)
    linear.lora_scaling = spec.scaling
    linear.lora_dropout = spec.dropout
    linear.register_forward_hook(hook)
    gated = name.rsplit(".", 1)[-1] == "linear_fc1" and linear.config.gated_linear_unit
    linear.sharded_state_dict = _sharded_state_dict(linear, column, gated)


def _sharded_state_dict(linear, column: bool, gated: bool):
    """The linear's sharded_state_dict with its adapters split over TP as attached (megatron-core's own marks
    them replicated): B's rows of a column-parallel linear, A's columns of a row-parallel one. The offsets it is
    given (layer, expert) apply to them as to the weight; a gated linear_fc1's B rows are [gate_r; up_r] on each
    rank, so they take megatron-core's swiglu factory, as its weight does in MLP.sharded_state_dict."""
    own = type(linear).sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = own(linear, prefix, sharded_offsets, metadata)
        out.update(make_sharded_tensors_for_checkpoint(
            {LORA_A: linear.lora_A.weight, LORA_B: linear.lora_B.weight}, prefix,
            {LORA_B: 0} if column else {LORA_A: 1}, sharded_offsets, tp_group=linear.tp_group,
            dp_cp_group=metadata["dp_cp_group"]))
        if gated:
            out[prefix + LORA_B] = apply_swiglu_sharded_factory(
                out[prefix + LORA_B], sharded_offsets, metadata.get("singleton_local_shards", False))
        return out

    return sharded_state_dict


def _seed_name(layer, name: str) -> str:
    """The name an adapter's A is seeded by: an expert's by its global index (EP rank x local experts + local
    index), so every EP layout starts from the same adapters."""
    parts = name.split(".")
    if "local_experts" not in parts:
        return name
    k = parts.index("local_experts")
    experts = layer.get_submodule(".".join(parts[:k]))
    parts[k + 1] = str(experts.ep_group.rank() * experts.num_local_experts + int(parts[k + 1]))
    return ".".join(parts)


def apply_lora(model: torch.nn.Module, spec: LoRASpec, seed: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Freeze `model` (one pipeline stage of a GPTModel) and add adapters to its target linears; returns
    (trainable, total) parameter counts of this rank."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.decoder.layers:
        targets = [(n, m) for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in spec.targets]
        for name, module in targets:
            _attach(module, spec, seed, layer.layer_number, _seed_name(layer, name), tp, tp_rank)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
