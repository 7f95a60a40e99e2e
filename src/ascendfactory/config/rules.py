"""The rules of a resolved config, checked before anything heavy runs; all violations reported together.
Rules only a stage knows (the engine's training math, the launcher's train.sh) are the stage's; pipeline.check
reports them with these.

Each problem names the YAML keys, their values and the rule. Model facts (heads, kv heads, layers) come
from `<model_name_or_path>/config.json`; when it cannot be read, the rules needing it are listed as unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ascendfactory import validation
from ascendfactory.ckpt import files as ckpt_files
from ascendfactory.config.loader import Resolved
from ascendfactory.config.moe_rules import (
    choose_experts,
    dispatcher_problem,
    grouped_gemm_problems,
    grouped_resume_problem,
)
from ascendfactory.config.paths import run_paths, run_split
from ascendfactory.config.schema import HANDLERS, LORA_TARGETS, PROMPT_TYPES
from ascendfactory.errors import UserError
from ascendfactory.families import hf_linear_owners
from ascendfactory.layout import RunLayout, parse_layer_list, stage_layers
from ascendfactory.modelinfo import (
    config_path,
    facts_from_config,
    glm_config,
    is_chatglm,
    load_config_json,
    positive_int,
)


def _lora_rules(cfg, bad, warnings: list[str]) -> None:
    unknown = [m for m in cfg.lora_target_modules if m not in LORA_TARGETS]
    if unknown or not cfg.lora_target_modules:
        what = f"unknown {', '.join(unknown)}" if unknown else "empty"
        owners = hf_linear_owners()  # HF names (LLaMA-Factory's lora_target) point at the fused linear
        hf = [f"{m} is in {owners[m]}" for m in unknown if m in owners]
        bad(f"lora_target_modules = {cfg.lora_target_modules}: {what}; choose from {', '.join(LORA_TARGETS)} "
            f"(or all){' (' + '; '.join(hf) + ': megatron-core fuses them)' if hf else ''}")
    if cfg.ckpt_load_type == 0:
        warnings.append("finetuning_type lora with ckpt_load_type 0: the frozen base weights are random; "
                        "use ckpt_load_type 1 to adapt the weights of model_name_or_path")


MODEL_RULES = (
    "TP*CP divides num_attention_heads",
    "num_key_value_heads divisible by TP",
    "num_hidden_layers divisible by PP",
)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # rules that need model files we could not read
    model_error: str | None = None  # why config.json could not be read

    def raise_if_problems(self) -> None:
        if self.problems:
            from ascendfactory.errors import UserErrors

            raise UserErrors(self.problems)


def lr_problem(cfg) -> str | None:
    if cfg.min_lr > cfg.lr:
        return f"min_lr = {cfg.min_lr} > lr = {cfg.lr}: the schedule decays from lr down to min_lr"
    return None


def parallel_problem(cfg, world: int, world_detail: str = "") -> str | None:
    """TP x PP x CP must divide the world, then the global batch the micro-batches of its DP replicas (also
    checked by the trainer, which knows the world it got)."""
    tp, pp, cp = cfg.tp, cfg.pp, cfg.cp
    if world % (tp * pp * cp):
        return (f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp}) x context_parallel_size "
                f"({cp}) = {tp * pp * cp} must divide the world size {world}{world_detail}")
    dp = world // (tp * pp * cp)
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        return (f"global_batch_size ({cfg.global_batch_size}) must be divisible by micro_batch_size "
                f"({cfg.micro_batch_size}) x data-parallel size ({dp} = world {world} / (TP x PP x CP))")
    return None


def check(res: Resolved, layout: RunLayout) -> Report:
    cfg, r = res.cfg, Report()

    def bad(msg: str) -> None:
        r.problems.append(msg)

    pp, cp = cfg.pp, cfg.cp  # value ranges (sizes >= 1, ...) are the schema's (config.schema)
    if cfg.train_iters is not None and cfg.train_iters <= 0 and cfg.epochs is None:
        bad(f"train_iters = {cfg.train_iters}: must be positive (or set `epochs`)")
    world_detail = f" ({layout.nnodes} node(s) x {layout.nproc_per_node} device(s))"
    for problem in (lr_problem(cfg), parallel_problem(cfg, layout.world_size, world_detail)):
        if problem:
            bad(problem)
    if cfg.seq_len > cfg.max_pe:
        bad(f"seq_len ({cfg.seq_len}) must be <= max_pe ({cfg.max_pe})")
    if cfg.seq_len > 32768 and cp == 1:
        r.warnings.append(f"seq_len ({cfg.seq_len}) > 32768 with context_parallel_size 1: "
                          "context_parallel_size >= 2 is recommended")
    if cfg.stage == "pt" and cfg.reset_position_ids and not cfg.reset_attention_mask:
        # RoPE sees positions only as offsets between tokens that attend to each other (megatron-core applies
        # it by sequence index); with a per-document mask the reset is exact, without one it does nothing.
        r.warnings.append("reset_position_ids has no effect without reset_attention_mask (rotary positions count "
                          "from the start of each sequence); set reset_attention_mask: true to restart them per "
                          "document")
    if bool(cfg.dataset) == bool(cfg.processed_data_dir):
        if cfg.dataset:
            bad(f"dataset ({cfg.dataset}) and processed_data_dir ({cfg.processed_data_dir}) are exclusive; set one")
        else:
            bad("neither dataset nor processed_data_dir is set; set exactly one")
    if cfg.ckpt_load_type not in (0, 1, 2):
        bad(f"ckpt_load_type = {cfg.ckpt_load_type}: must be 0 (random init), 1 (weights) or 2 (resume)")
    if cfg.finetuning_type == "lora":
        _lora_rules(cfg, bad, r.warnings)
    if cfg.stage not in ("pt", "sft"):
        bad(f"stage = {cfg.stage!r}: must be pt (pretrain) or sft")
    if cfg.handler_name not in HANDLERS:
        bad(f"handler_name = {cfg.handler_name!r}: unknown handler; use one of {', '.join(HANDLERS)}")
    if cfg.prompt_type not in PROMPT_TYPES:
        bad(f"prompt_type = {cfg.prompt_type!r}: unknown chat template; use one of {', '.join(PROMPT_TYPES)}")
    if cfg.async_save and cfg.ckpt_format != "torch_dist":
        bad("async_save = true: only ckpt_format torch_dist saves asynchronously (megatron-core's async save); "
            "set ckpt_format: torch_dist or async_save: false")
    if cfg.ckpt_load_type == 2 and not cfg.user_converted_ckpt_path:
        save_dir = run_paths(cfg).save_dir
        if not (cfg.train_auto_resume and ckpt_files.iterations_on_disk(save_dir)):
            bad("ckpt_load_type = 2 (resume) needs user_converted_ckpt_path (a training checkpoint), "
                f"or train_auto_resume with a checkpoint in {save_dir}")
    layer_list = parse_layer_list(cfg.num_layer_list)
    if layer_list is not None and len(layer_list) != pp:
        bad(f"num_layer_list ({cfg.num_layer_list}) has {len(layer_list)} entries; "
            f"pipeline_model_parallel_size is {pp}")
    _check_model(cfg, layer_list, r)
    _check_experts(cfg, layout, r)
    _check_checkpoint_layout(cfg, layout, r)
    r.problems += validation.problems(cfg)
    return r


def _check_experts(cfg, layout: RunLayout, r: Report) -> None:
    """Expert parallel (SPEC.md section 8): EP ranks split the experts, and split the DP x CP ranks of each
    TP x PP position (expert TP = TP)."""
    ep = cfg.ep
    if ep < 1:
        r.problems.append(f"expert_model_parallel_size = {ep}: must be at least 1")
        return
    if ep > 1 and layout.dp and (layout.dp * cfg.cp) % ep:
        r.problems.append(f"expert_model_parallel_size ({ep}) must divide data-parallel size x "
                          f"context_parallel_size ({layout.dp} x {cfg.cp} = {layout.dp * cfg.cp})")
    try:
        facts = facts_from_config(load_config_json(cfg.model_name_or_path))
    except UserError:  # reported by _check_model (unchecked rules, or the unsupported architecture at train)
        if ep > 1:  # at EP 1 there is nothing to check
            r.unchecked.append("num_experts divisible by EP")
        return
    source = f"{cfg.model_name_or_path}/config.json"
    if ep > 1 and not facts.num_experts:
        r.problems.append(f"expert_model_parallel_size = {ep}: {facts.architecture} ({source}) has no experts; "
                          "set expert_model_parallel_size: 1")
    elif facts.num_experts % ep:
        r.problems.append(f"expert_model_parallel_size ({ep}) must divide num_experts ({facts.num_experts}, from "
                          f"{source})")
    if facts.num_experts and cfg.moe_grouped_gemm is True:  # auto falls back to SequentialMLP instead
        r.problems += grouped_gemm_problems(cfg, layout.device)
    if facts.num_experts and (problem := dispatcher_problem(cfg, layout.device)):
        r.problems.append(problem)
    if facts.num_experts and cfg.tp > 1 and not cfg.sequence_parallel:
        # megatron-core's MoE layer refuses to train with TP but without SP (its token dispatch assumes SP)
        r.problems.append(f"sequence_parallel: an MoE model ({facts.architecture}) at tensor_model_parallel_size "
                          f"{cfg.tp} needs sequence_parallel: true; set it")


def _check_model(cfg, layer_list, r: Report) -> None:
    source = config_path(cfg.model_name_or_path)
    try:
        mc = load_config_json(cfg.model_name_or_path)
        kv_key = "num_key_value_heads"
        if is_chatglm(mc):  # the original GLM layout: its kv groups are multi_query_group_num
            mc, kv_key = glm_config(mc), "multi_query_group_num"
        heads = positive_int(mc, "num_attention_heads", str(source))
        kv = positive_int(mc, "num_key_value_heads", str(source), default=heads)
        layers = positive_int(mc, "num_hidden_layers", str(source))
    except UserError as e:
        if source.is_file():  # there, but broken: refused now, not left to a later stage
            r.problems.append(str(e))
        else:  # model files not on this machine (plan elsewhere): say which rules were not checked
            r.model_error, r.unchecked = str(e), list(MODEL_RULES)
        return
    except KeyError as e:
        r.problems.append(f"{source}: missing key {e}; is this an HF causal-LM config.json?")
        return
    tp, pp, cp = cfg.tp, cfg.pp, cfg.cp
    if heads % (tp * cp):
        r.problems.append(f"tensor_model_parallel_size ({tp}) x context_parallel_size ({cp}) = {tp * cp} must "
                          f"divide num_attention_heads ({heads}, from {cfg.model_name_or_path}/config.json)")
    if kv % tp:
        r.problems.append(f"{kv_key} ({kv}, from {cfg.model_name_or_path}/config.json) must be "
                          f"divisible by tensor_model_parallel_size ({tp})")
    if layer_list is not None:
        if sum(layer_list) != layers:
            r.problems.append(f"num_layer_list ({cfg.num_layer_list}) sums to {sum(layer_list)}; the model has "
                              f"{layers} layers")
    elif layers % pp:
        r.problems.append(f"num_hidden_layers ({layers}, from {cfg.model_name_or_path}/config.json) must be "
                          f"divisible by pipeline_model_parallel_size ({pp}), or set num_layer_list")


def _check_checkpoint_layout(cfg, layout: RunLayout, r: Report) -> None:
    """The checkpoint to start from fits the run's layout (read from folder names and manifests: no torch
    needed). A torch_dist one always does (megatron-core reshards it on load); a legacy one's weights alone
    (ckpt_load_type 1) are resharded into the run's layout by the convert stage; a full resume (ckpt_load_type 2,
    auto-resume) of a legacy one from another TP/PP/EP is refused naming the command that converts it. An
    auto-resume also needs, as its manifest records them, the run's layers per PP stage (legacy) and the run's
    experts' implementation (the optimizer state follows the experts' parameters)."""
    run = (cfg.tp, cfg.pp, cfg.ep)
    if cfg.train_auto_resume and (found := _newest_complete(run_paths(cfg).save_dir)):
        iter_path, manifest = found
        where = f"train_auto_resume: {iter_path}"
        have = tuple(manifest.get(k) for k in ("tp", "pp", "ep"))  # None: a manifest of an older version
        legacy = not ckpt_files.is_torch_dist(iter_path)
        if legacy and None not in have and have != run:
            r.problems.append(ckpt_files.legacy_resume_refusal(
                where, iter_path.parent, have, run, cfg.ckpt_format))
        elif legacy and "num_layer_list" in manifest and (splits := _splits(cfg, manifest["num_layer_list"])):
            if splits[0] != splits[1]:
                r.problems.append(f"train_auto_resume: {ckpt_files.split_refusal(iter_path, *splits)}")
        if (grouped := manifest.get("moe_grouped_gemm")) is not None:
            ours = choose_experts(cfg, layout.device)[0]
            if problem := grouped_resume_problem(bool(grouped), ours, where):
                r.problems.append(problem)
        return
    if cfg.ckpt_load_type == 0 or not cfg.user_converted_ckpt_path:
        return
    ckpt = Path(cfg.user_converted_ckpt_path)
    try:
        saved = ckpt_files.saved_layout(ckpt)
    except UserError as e:
        r.problems.append(f"user_converted_ckpt_path: {e}")
        return
    if saved is not None and cfg.ckpt_load_type == 2 and saved != run:
        r.problems.append(ckpt_files.legacy_resume_refusal(
            f"user_converted_ckpt_path {ckpt}", ckpt, saved, run, cfg.ckpt_format))


def _splits(cfg, saved_list) -> tuple[list[int], list[int]] | None:
    """(the run's, the checkpoint's) layers per PP stage over the run's PP size; None when the run's keys do not fit
    (reported by _check_model) or the model cannot be read."""
    try:
        ours = list(run_split(cfg))
        return ours, stage_layers(sum(ours), cfg.pp, saved_list)
    except (UserError, ValueError, TypeError):  # TypeError: a manifest entry that is no list of numbers
        return None


def _newest_complete(save_dir: Path) -> tuple[Path, dict] | None:
    """The iteration auto-resume would take (newest with a complete manifest; checksums are the engine's) and
    its manifest."""
    for it in ckpt_files.iterations_on_disk(save_dir):
        iter_path = save_dir / ckpt_files.iter_dir_name(it)
        if ckpt_files.problem_of(iter_path, require_manifest=True) is None:
            try:
                return iter_path, json.loads((iter_path / ckpt_files.MANIFEST).read_text())
            except (OSError, ValueError):
                continue
    return None
