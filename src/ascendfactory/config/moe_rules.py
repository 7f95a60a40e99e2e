"""The MoE keys' rules (SPEC.md section 8) that depend on the device: the token dispatcher and the experts'
implementation (moe_grouped_gemm). `plan` / `train` check them before any stage (a full resume of the run's own
checkpoint across implementations included, from its manifest); the engine applies the same choices
(engine/moe.py)."""

from __future__ import annotations

from ascendfactory.config.schema import ExpConfig
from ascendfactory.device_facts import BACKENDS, grouped_matmul, moe_token_dispatcher, uneven_all_gather
from ascendfactory.memory import default_precision

EXPERT_LINEARS = ("linear_fc1", "linear_fc2")


def _precision(cfg: ExpConfig, kind: str) -> str:
    return default_precision(kind) if cfg.precision == "auto" else cfg.precision


def dispatcher(cfg: ExpConfig, kind: str) -> str:
    """The token dispatcher: the key's, or under auto the device's."""
    return moe_token_dispatcher(kind) if cfg.moe_token_dispatcher_type == "auto" else cfg.moe_token_dispatcher_type


def dispatcher_problem(cfg: ExpConfig, kind: str) -> str | None:
    """The alltoall dispatcher at TP > 1 gathers uneven token counts over the TP ranks: gloo cannot."""
    if dispatcher(cfg, kind) == "alltoall" and cfg.tp > 1 and not uneven_all_gather(kind):
        return (f"moe_token_dispatcher_type: alltoall at tensor_model_parallel_size {cfg.tp} gathers uneven token "
                f"counts over the TP ranks, which {BACKENDS[kind]} cannot; set it to allgather (or auto)")
    return None


def grouped_gemm_problems(cfg: ExpConfig, kind: str) -> list[str]:
    """Why megatron-core's GroupedMLP cannot train this run on this device: `plan` refuses moe_grouped_gemm: true
    with these lines (one each, naming the keys), auto falls back to SequentialMLP."""
    return [f"moe_grouped_gemm: true {why}; {fix}" for why, fix in grouped_gemm_unmet(cfg, kind)]


def grouped_gemm_unmet(cfg: ExpConfig, kind: str) -> list[tuple[str, str]]:
    """(what GroupedMLP lacks here, the fix) pairs."""
    unmet = []
    if grouped_matmul(kind) is None:
        what = "the grouped_gemm package is not installed" if kind == "cuda" else "none is provided for it yet"
        unmet.append((f"needs a grouped matmul on the device ({kind}: {what})",
                      "install grouped_gemm or set moe_grouped_gemm: auto" if kind == "cuda"
                      else "set moe_grouped_gemm: auto or false"))
    if (precision := _precision(cfg, kind)) != "bf16":
        unmet.append((f"needs precision: bf16 (megatron-core's GroupedMLP computes in bf16 only), the run's is "
                      f"{precision}{' (auto on ' + kind + ')' if cfg.precision == 'auto' else ''}",
                      "set precision: bf16 or moe_grouped_gemm: false"))
    if lora := lora_on_experts(cfg):
        unmet.append((f"cannot take finetuning_type lora on the experts (lora_target_modules {', '.join(lora)}): "
                      "GroupedMLP has no per-expert linears to adapt",
                      f"set moe_grouped_gemm: false, or leave {' and '.join(EXPERT_LINEARS)} out of "
                      "lora_target_modules"))
    return unmet


def choose_experts(cfg: ExpConfig, kind: str) -> tuple[bool, str]:
    """(GroupedMLP?, why) for an MoE model. true: GroupedMLP (grouped_gemm_problems says when it cannot run here);
    auto: where the device has a real grouped matmul (the CPU's reference is no faster) and nothing else rules it
    out; false: SequentialMLP."""
    if cfg.moe_grouped_gemm is False:
        return False, "moe_grouped_gemm: false"
    matmul = grouped_matmul(kind)
    if cfg.moe_grouped_gemm is True:
        return True, f"moe_grouped_gemm: true, grouped matmul: {matmul}"
    if matmul == "reference":
        return False, f"moe_grouped_gemm: auto; {kind} has only the reference grouped matmul, no faster"
    if unmet := grouped_gemm_unmet(cfg, kind):
        return False, f"moe_grouped_gemm: auto; GroupedMLP {unmet[0][0]}"
    return True, f"moe_grouped_gemm: auto, grouped matmul: {matmul}"


def grouped_resume_problem(saved: bool, ours: bool, where) -> str | None:
    """A full resume across expert implementations: refused (weights alone load across it)."""
    if saved == ours:
        return None
    name = {True: "GroupedMLP (moe_grouped_gemm: true)", False: "SequentialMLP (moe_grouped_gemm: false)"}
    return (f"{where}: its experts trained as {name[saved]}, this run builds {name[ours]}, and the optimizer state "
            f"follows the experts' parameters; set moe_grouped_gemm: {str(saved).lower()} to resume, or "
            "ckpt_load_type 1 to load its weights with a fresh optimizer")


def lora_on_experts(cfg: ExpConfig) -> list[str]:
    """The expert linears a LoRA run adapts (the target names apply to the experts too)."""
    return [m for m in cfg.lora_target_modules if m in EXPERT_LINEARS] if cfg.finetuning_type == "lora" else []
