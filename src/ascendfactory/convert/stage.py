"""The `train` pipeline's convert and export stages.

decide_* only stat files and read small json (no torch import): `plan` calls them.
"""

from __future__ import annotations

import json
import logging

from ascendfactory.ckpt.files import read_tracker, saved_layout
from ascendfactory.config.paths import RunPaths, reshard_on_load, run_split, saved_split
from ascendfactory.config.schema import ExpConfig
from ascendfactory.convert.fingerprint import (
    adapter_complete,
    adapter_fingerprint,
    conversion_complete,
    conversion_fingerprint,
    export_complete,
    export_fingerprint,
    reshard_fingerprint,
)
from ascendfactory.convert.options import dtype_name
from ascendfactory.convert.target import ours
from ascendfactory.errors import UserError
from ascendfactory.layout import ShardPlan, plan_layout
from ascendfactory.modelinfo import read_model_facts

log = logging.getLogger(__name__)

EXPORT_SHARD_SIZE = 5 * 10**9


def _convert_plan(cfg: ExpConfig):
    _, layout = plan_layout(cfg.model_name_or_path, cfg.tp, cfg.pp, cfg.num_layer_list,
                            cfg.make_vocab_size_divisible_by, cfg.ep)
    return layout, conversion_fingerprint(cfg.model_name_or_path, layout, None)


def _decide_reshard(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    """ckpt_load_type 1 from a legacy checkpoint of another layout (config.paths.reshard_on_load)."""
    target, src = paths.converted_ckpt_dir, cfg.user_converted_ckpt_path
    layers = list(run_split(cfg))
    fp = reshard_fingerprint(src, read_tracker(src), (cfg.tp, cfg.pp, cfg.ep, layers), "legacy",
                             cfg.model_name_or_path, full=False)
    if ours(target, "resharded checkpoint dir") == fp and conversion_complete(
            target, ShardPlan(cfg.tp, cfg.pp, tuple(layers), 0, 0, cfg.ep)):
        return False, f"{target} already holds the weights of {src} at the run's layout"
    tp, pp, ep = saved_layout(src)
    split = "" if (tp, pp, ep) != (cfg.tp, cfg.pp, cfg.ep) else f", layers per stage {list(saved_split(str(src)))}"
    return True, (f"weights of {src} (TP{tp} PP{pp}{f' EP{ep}' if ep > 1 else ''}{split}) resharded -> {target} "
                  f"(ckpt_load_type 1)")


def decide_convert(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    if cfg.ckpt_load_type == 0:
        return False, "ckpt_load_type is 0 (random init): no weights to convert"
    if cfg.user_converted_ckpt_path and reshard_on_load(cfg):
        return _decide_reshard(cfg, paths)
    if cfg.user_converted_ckpt_path:
        return False, f"using user_converted_ckpt_path {cfg.user_converted_ckpt_path}"
    layout, fp = _convert_plan(cfg)
    target = paths.converted_ckpt_dir
    # Foreign content in the target is refused now, not after the other stages ran.
    if ours(target, "converted checkpoint dir") == fp and conversion_complete(target, layout):
        return False, f"{target} already holds this conversion of {cfg.model_name_or_path}"
    ep = f" EP{layout.ep}" if layout.ep > 1 else ""
    return True, (f"{cfg.model_name_or_path} -> {target} (TP{layout.tp} PP{layout.pp}{ep}, "
                  f"layers per stage {list(layout.layers)})")


def run_convert(cfg: ExpConfig, paths: RunPaths) -> None:
    from ascendfactory.convert.hf2mg import hf_to_megatron

    if cfg.user_converted_ckpt_path:  # only here when reshard_on_load: a legacy checkpoint of another layout
        from ascendfactory.convert.reshard import reshard

        log.info(f"weights: {cfg.user_converted_ckpt_path} is a legacy checkpoint of another layout than the run's; "
                 f"its weights are resharded into {paths.converted_ckpt_dir} and loaded from there")
        reshard(cfg.user_converted_ckpt_path, paths.converted_ckpt_dir, cfg.tp, cfg.pp, cfg.ep, cfg.num_layer_list,
                "legacy", cfg.model_name_or_path, weights_only=True, replace_ours=True,
                flag="resharded checkpoint dir")
        return

    # Our own folder under output_dir (pipeline.check_outputs refused one that no run there made): a conversion
    # of another source / layout there is stale, replace it.
    hf_to_megatron(cfg.model_name_or_path, paths.converted_ckpt_dir, cfg.tp, cfg.pp, cfg.num_layer_list,
                   None, cfg.make_vocab_size_divisible_by, ep=cfg.ep, replace_ours=True,
                   flag="converted checkpoint dir")


def export_dtype(cfg: ExpConfig) -> str | None:
    """The source model's own dtype (so the export matches what the user started from), if it names one."""
    try:
        return dtype_name(read_model_facts(cfg.model_name_or_path).torch_dtype)
    except UserError:
        return None


def export_iteration(cfg: ExpConfig, paths: RunPaths) -> int:
    """The checkpoint the export converts: the newest, or with export_checkpoint best the one best_checkpoint.json
    names (the lowest validation loss among the saves)."""
    if cfg.export_checkpoint != "best":
        return read_tracker(paths.save_dir)
    try:
        return int(json.loads(paths.best_checkpoint.read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"export_checkpoint best: {paths.best_checkpoint} names no checkpoint (no evaluation at a "
                        "save yet); set export_checkpoint: last, or train with a validation set") from None


def decide_export(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    """Meant to be asked after training: before it, an up-to-date answer describes the checkpoint on disk now."""
    if not cfg.convert_mg2hf_at_last:
        return False, "convert_mg2hf_at_last is false"
    marker = ours(paths.hf_save_dir, "hf_save_dir")  # foreign content: refused before training, not after
    try:  # no checkpoint yet (or a damaged one): there is nothing to be up to date with
        it = export_iteration(cfg, paths)
        fp = export_fingerprint(paths.save_dir, it, cfg.model_name_or_path, export_dtype(cfg), EXPORT_SHARD_SIZE)
    except (UserError, OSError):
        fp = None
    lora = cfg.finetuning_type == "lora"
    adapter = paths.lora_adapter_dir
    adapter_marker = ours(adapter, "lora adapter dir") if lora else None
    if fp is not None and marker == fp and export_complete(paths.hf_save_dir) and (not lora or (
            adapter_marker == adapter_fingerprint(paths.save_dir, it, cfg.model_name_or_path)
            and adapter_complete(adapter))):
        return False, f"{paths.hf_save_dir} already holds the export of iteration {it}" + (
            f", {adapter} its adapter" if lora else "")
    which = "best checkpoint (lowest validation loss)" if cfg.export_checkpoint == "best" else "final checkpoint"
    return True, f"{which} in {paths.save_dir} -> {paths.hf_save_dir}" + (
        f" (merged) and {adapter} (PEFT adapter)" if lora else "")


def run_export(cfg: ExpConfig, paths: RunPaths) -> None:
    from ascendfactory.convert.mg2hf import megatron_to_hf
    from ascendfactory.convert.peft_adapter import export_peft_adapter

    it = export_iteration(cfg, paths)
    if cfg.export_checkpoint == "best":
        log.info(f"export: the best checkpoint, iteration {it} (named by {paths.best_checkpoint})")
    # Replaced only when a run of this output_dir made it, or with overwrite_output (pipeline.check_outputs).
    megatron_to_hf(paths.save_dir, paths.hf_save_dir, cfg.model_name_or_path, it, export_dtype(cfg),
                   EXPORT_SHARD_SIZE, replace_ours=True, flag="hf_save_dir")
    if cfg.finetuning_type == "lora":
        export_peft_adapter(paths.save_dir, paths.lora_adapter_dir, cfg.model_name_or_path, it, replace_ours=True,
                            flag="lora adapter dir")
