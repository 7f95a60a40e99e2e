"""What each device kind offers, without importing torch (`plan` checks the rules before any stage runs): its
process-group backend and what that can do, the MoE token dispatcher and the grouped matmul it gets. The device
adapter (engine/device.py) acts on these facts; the rules (config/moe_rules.py) read them."""

from __future__ import annotations

import importlib.util

BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def uneven_all_gather(kind: str) -> bool:
    """gloo's all_gather needs equal sizes (the alltoall MoE dispatcher gathers uneven ones at TP > 1)."""
    return BACKENDS[kind] != "gloo"


def moe_token_dispatcher(kind: str) -> str:
    """MoE tokens to their experts under auto: all-to-all on the accelerators' backends (hccl, nccl); gloo gets the
    allgather dispatcher (same results; the alltoall one also runs on gloo at TP 1, set explicitly)."""
    return "allgather" if BACKENDS[kind] == "gloo" else "alltoall"


def grouped_matmul(kind: str) -> str | None:
    """The grouped matmul megatron-core's GroupedMLP gets on this device (no torch import: `plan` asks too):
    "grouped_gemm" on CUDA with that package installed (megatron-core imports it itself), "reference" on the CPU
    (per-expert torch.matmul: GroupedMLP runs, not faster than SequentialMLP), None elsewhere. NPU: MindSpeed wraps
    torch_npu.npu_grouped_matmul in an autograd Function of its own (the backward is two more grouped matmuls, one
    grouped over K, through group_type / group_list_type arguments that only newer torch_npu releases document);
    not wired up here without an NPU to check it on."""
    if kind == "cuda":
        return "grouped_gemm" if importlib.util.find_spec("grouped_gemm") is not None else None
    if kind == "cpu":
        return "reference"
    return None
