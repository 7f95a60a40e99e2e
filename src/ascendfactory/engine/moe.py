"""What a training run adds for an MoE model (SPEC.md section 8): megatron-core's expert-parallel groups, the MoE
TransformerConfig entries the config keys choose, and the load-balancing loss for the log."""

from __future__ import annotations

import logging
from collections import OrderedDict

from ascendfactory.config.moe_rules import (
    EXPERT_LINEARS,
    choose_experts,
    dispatcher,
    dispatcher_problem,
    grouped_gemm_problems,
    grouped_resume_problem,
)
from ascendfactory.config.schema import ExpConfig
from ascendfactory.engine.device import Device
from ascendfactory.errors import UserError, UserErrors
from ascendfactory.logs import TRAIN
from ascendfactory.modelinfo import ModelFacts

LOAD_BALANCING_LOSS = "load_balancing_loss"  # megatron-core's tracker name, and our log / metrics key
train_log = logging.getLogger(TRAIN)


def parallel_state_kwargs(cfg: ExpConfig) -> dict:
    """initialize_model_parallel's expert entries: EP ranks, expert TP = TP (the converter's split)."""
    return dict(expert_model_parallel_size=cfg.ep, expert_tensor_parallel_size=cfg.tp)


def config_overrides(cfg: ExpConfig, facts: ModelFacts, dev: Device) -> dict:
    """TransformerConfig entries from the MoE keys (none for a dense model): aux-loss weight (default: config.json's
    router_aux_loss_coef, as model.moe_config sets it), token dispatcher (auto: the device's), the experts'
    implementation (moe_grouped_gemm: GroupedMLP or SequentialMLP, logged with the reason)."""
    if not facts.num_experts:
        return {}
    if cfg.moe_grouped_gemm is True and (problems := grouped_gemm_problems(cfg, dev.kind)):
        raise UserErrors(problems)
    grouped, why = choose_experts(cfg, dev.kind)
    train_log.info(f"experts: {'GroupedMLP' if grouped else 'SequentialMLP'} ({why})")
    if problem := dispatcher_problem(cfg, dev.kind):
        raise UserError(problem)
    out = dict(moe_token_dispatcher_type=dispatcher(cfg, dev.kind), moe_grouped_gemm=grouped)
    if cfg.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = cfg.moe_aux_loss_coeff
    return out


def checkpoint_args(tconfig) -> dict:
    """What a checkpoint records of the experts' implementation (Megatron-LM's arg name): the optimizer state
    follows its parameters (GroupedMLP: two per layer), so a full resume needs the same one."""
    return {"moe_grouped_gemm": bool(tconfig.moe_grouped_gemm)} if tconfig.num_moe_experts else {}


def resume_problem(saved_args: dict, run_args: dict, where) -> str | None:
    """A full resume across expert implementations, from the args both record. Checkpoints without the entry
    (converted, or of older runs) hold SequentialMLP's."""
    return grouped_resume_problem(*(bool(a.get("moe_grouped_gemm")) for a in (saved_args, run_args)), where)


# ---------------------------------------------------------------- GroupedMLP <-> one tensor per expert


def fuse_experts(fc1: list, fc2: list) -> tuple:
    """Local experts' linear_fc1 [2F/TP, H] (GLU rows [gate; up]) and linear_fc2 [H, F/TP] weights (SequentialMLP's,
    as checkpoints hold them) -> GroupedMLP's weight1 [H, E*2F/TP] and weight2 [E*F/TP, H]: GroupedMLP views them
    as [E, H, 2F/TP] and [E, F/TP, H], expert e's weights transposed."""
    import torch

    hidden = fc1[0].shape[1]
    return (torch.stack([w.t() for w in fc1]).reshape(hidden, -1),
            torch.stack([w.t() for w in fc2]).reshape(-1, hidden))


def split_experts(weight1, weight2, n: int) -> tuple[list, list]:
    """fuse_experts' inverse: each expert's tensors in storage of their own (torch.save writes a view's whole
    storage), as SequentialMLP's state dict holds them."""
    import torch

    hidden = weight1.shape[0]

    def own(w):
        return w.t().clone(memory_format=torch.contiguous_format)

    return ([own(w) for w in weight1.reshape(n, hidden, -1)], [own(w) for w in weight2.reshape(n, -1, hidden)])


def _expert_keys(prefix: str, i: int) -> list[str]:
    """SequentialMLP's state-dict keys of local expert i (its local linears' empty _extra_state included)."""
    return [f"{prefix}local_experts.{i}.{lin}.{part}" for lin in EXPERT_LINEARS for part in ("weight", "_extra_state")]


def grouped_experts(model) -> dict[str, int]:
    """'<...>.mlp.experts.' -> local experts, of each GroupedMLP in the model."""
    from megatron.core.transformer.moe.experts import GroupedMLP

    return {f"{name}.": m.num_local_experts for name, m in model.named_modules() if isinstance(m, GroupedMLP)}


def experts_as_saved(state_dict: dict, model) -> dict:
    """The model's state dict as a legacy checkpoint holds it: each GroupedMLP's weight1 / weight2 become its local
    experts' tensors under SequentialMLP's names, in SequentialMLP's order, with its module records (torch's
    _metadata, pickled too): the same file as a SequentialMLP run's for the same weights."""
    fused = grouped_experts(model)
    if not fused:
        return state_dict
    out = OrderedDict()
    for key, value in state_dict.items():
        prefix = key.rpartition(".")[0] + "."
        if prefix not in fused:
            out[key] = value
        elif key == prefix + "weight1":
            fc1, fc2 = split_experts(value, state_dict[prefix + "weight2"], fused[prefix])
            for i, (w1, w2) in enumerate(zip(fc1, fc2, strict=True)):
                k1, e1, k2, e2 = _expert_keys(prefix, i)
                out.update({k1: w1, e1: None, k2: w2, e2: None})
    out._metadata = OrderedDict()
    for module, record in state_dict._metadata.items():
        out._metadata[module] = record
        if module + "." in fused:  # SequentialMLP's modules under it, each as nn.Module records itself
            out._metadata[f"{module}.local_experts"] = {"version": record["version"]}
            for i in range(fused[module + "."]):
                for sub in ("", *(f".{lin}" for lin in EXPERT_LINEARS)):
                    out._metadata[f"{module}.local_experts.{i}{sub}"] = {"version": record["version"]}
    return out


def experts_as_model(weights: dict, model) -> dict:
    """experts_as_saved's inverse, for loading a legacy checkpoint (one tensor per expert) into GroupedMLPs; a
    GroupedMLP whose experts the file lacks is left to load_state_dict's missing keys."""
    fused = grouped_experts(model)
    if not fused:
        return weights
    out = dict(weights)
    for prefix, n in fused.items():
        keys = [_expert_keys(prefix, i) for i in range(n)]
        if not all(k[0] in out and k[2] in out for k in keys):
            continue
        fc1, fc2 = [out.pop(k[0]) for k in keys], [out.pop(k[2]) for k in keys]
        for k in keys:
            out.pop(k[1], None)
            out.pop(k[3], None)
        out[prefix + "weight1"], out[prefix + "weight2"] = fuse_experts(fc1, fc2)
    return out


def routing_padding(padding_mask, tconfig) -> dict:
    """The model's padding_mask argument (MoE only): the collate's padding is left out of the routing statistics
    and so of the load-balancing loss, which then does not depend on the padding (PP pads to seq_len). GPTModel
    splits the mask over the sequence-parallel ranks on the first pipeline stage only: later stages get their
    chunk here."""
    if not tconfig.num_moe_experts:
        return {}
    from megatron.core import parallel_state as ps

    if tconfig.sequence_parallel and not ps.is_pipeline_first_stage():
        padding_mask = padding_mask.chunk(tconfig.tensor_model_parallel_size, dim=1)[
            ps.get_tensor_model_parallel_rank()]
    return {"padding_mask": padding_mask}


def load_balancing_loss(tconfig, num_micro: int) -> float | None:
    """Collective (all ranks, every iteration): this iteration's load-balancing loss, averaged over the MoE layers,
    micro-batches and DP ranks as megatron's training log does (track_moe_metrics sums the layers over the PP
    stages, averages over DP, then clears the tracker); None for a dense model or without the aux loss."""
    if not tconfig.num_moe_experts or tconfig.moe_router_load_balancing_type != "aux_loss":
        return None
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    total: dict = {}
    track_moe_metrics(loss_scale=1.0 / num_micro, iteration=0, total_loss_dict=total, force_initialize=True,
                      track_names=[LOAD_BALANCING_LOSS], num_layers=tconfig.num_layers,
                      moe_layer_freq=tconfig.moe_layer_freq)
    return float(total[LOAD_BALANCING_LOSS])
