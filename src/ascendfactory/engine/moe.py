"""What a training run adds for an MoE model (SPEC.md section 8): megatron-core's expert-parallel groups, the MoE
TransformerConfig entries the config keys choose, and the load-balancing loss for the log."""

from __future__ import annotations

from ascendfactory.config.schema import ExpConfig
from ascendfactory.engine.device import Device
from ascendfactory.errors import UserError
from ascendfactory.modelinfo import ModelFacts

LOAD_BALANCING_LOSS = "load_balancing_loss"  # megatron-core's tracker name, and our log / metrics key


def parallel_state_kwargs(cfg: ExpConfig) -> dict:
    """initialize_model_parallel's expert entries: EP ranks, expert TP = TP (the converter's split)."""
    return dict(expert_model_parallel_size=cfg.ep, expert_tensor_parallel_size=cfg.tp)


def config_overrides(cfg: ExpConfig, facts: ModelFacts, dev: Device) -> dict:
    """TransformerConfig entries from the MoE keys (none for a dense model): aux-loss weight (default: config.json's
    router_aux_loss_coef, as model.moe_config sets it), token dispatcher (auto: the device's), SequentialMLP experts."""
    if not facts.num_experts:
        return {}
    if cfg.moe_grouped_gemm is True:
        # GroupedMLP keeps all local experts in two tensors (weight1 / weight2): our checkpoints, like the hub's,
        # hold one tensor per expert, and no mapping between the two exists yet
        raise UserError("moe_grouped_gemm: true is not supported yet (checkpoints hold one tensor per expert, "
                        "megatron-core's GroupedMLP two for all); set moe_grouped_gemm: auto or false")
    dispatcher = dev.moe_token_dispatcher if cfg.moe_token_dispatcher_type == "auto" else cfg.moe_token_dispatcher_type
    if dispatcher == "alltoall" and cfg.tp > 1 and not dev.uneven_all_gather:
        raise UserError(f"moe_token_dispatcher_type: alltoall at tensor_model_parallel_size {cfg.tp} gathers uneven "
                        f"token counts over the TP ranks, which {dev.backend} cannot; set it to allgather (or auto)")
    out = dict(moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False)
    if cfg.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = cfg.moe_aux_loss_coeff
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
