"""The `train` pipeline: preprocess -> convert -> train -> export, each skipped when its output is complete
or not needed, with the reason printed (and shown by `plan`)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.ckpt import files as ckpt_files
from ascendfactory.config import rules
from ascendfactory.config.loader import Resolved, dump_config, resolve
from ascendfactory.config.paths import RunPaths, run_paths
from ascendfactory.config.schema import ExpConfig
from ascendfactory.engine.training_math import config_problems as engine_problems
from ascendfactory.errors import UserError
from ascendfactory.fsutil import probe_writable, write_text_atomic
from ascendfactory.launch.cluster import cluster_layout
from ascendfactory.launch.torchrun import config_problems as launch_problems
from ascendfactory.layout import RunLayout

STAGES = ("preprocess", "convert", "train", "export")


@dataclass
class Decision:
    name: str
    run: bool
    reason: str

    def as_json(self) -> dict:
        return {"name": self.name, "run": self.run, "reason": self.reason}


@dataclass
class Plan:
    resolved: Resolved
    layout: RunLayout
    report: rules.Report
    paths: RunPaths

    @property
    def cfg(self) -> ExpConfig:
        return self.resolved.cfg


def check(res: Resolved, layout: RunLayout) -> rules.Report:
    """Every rule, reported together before any stage runs: the config's own (config.rules) and those only a
    stage knows (the engine's training math, the launcher's train.sh)."""
    report = rules.check(res, layout)
    report.problems += engine_problems(res.cfg) + launch_problems(res.cfg)
    return report


def make_plan(cfgs_yaml: str, model: str, exp: str, overrides: list[str], flags: dict) -> Plan:
    res = resolve(cfgs_yaml, model, exp, overrides)
    layout = cluster_layout(res.cfg, flags)
    report = check(res, layout)
    report.raise_if_problems()
    return Plan(res, layout, report, run_paths(res.cfg))


def decide_train(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    done = _tracker_iteration(paths.save_dir)
    # With `epochs` the iteration count is derived by the trainer from the data, so it is not known here.
    if done is not None and cfg.epochs is None and cfg.train_iters and done >= cfg.train_iters:
        return False, f"complete: {paths.save_dir} holds iteration {done} of {cfg.train_iters}"
    iters = f"{cfg.train_iters} iterations" if cfg.epochs is None else f"{cfg.epochs} epoch(s)"
    if cfg.finetuning_type == "lora":
        iters += f" of LoRA (r {cfg.lora_r} on {', '.join(cfg.lora_target_modules)})"
    if cfg.train_auto_resume and ckpt_files.iterations_on_disk(paths.save_dir):
        return True, f"{iters}, auto-resume from the newest valid checkpoint in {paths.save_dir}"
    source = {
        0: "random init (ckpt_load_type 0)",
        1: f"weights from {paths.converted_ckpt_dir} (ckpt_load_type 1: fresh optimizer, iteration 0)",
        2: f"full resume from {paths.converted_ckpt_dir} (ckpt_load_type 2)",
    }.get(cfg.ckpt_load_type, "?")
    return True, f"{iters}, {source}"


def _tracker_iteration(save_dir: Path) -> int | None:
    try:
        return ckpt_files.read_tracker(save_dir)
    except UserError:
        return None


def decide_stage(plan: Plan, name: str, strict: bool = True) -> Decision:
    """One stage's run/skip decision. Not strict (plan): an input that cannot be inspected (e.g. model
    files not on this machine) is reported in the reason instead of stopping the plan."""
    from ascendfactory.convert import stage as convert_stage
    from ascendfactory.data import stage as data_stage

    cfg, paths = plan.cfg, plan.paths
    decide = {
        "preprocess": data_stage.decide,
        "convert": convert_stage.decide_convert,
        "train": decide_train,
        "export": convert_stage.decide_export,
    }[name]
    try:
        run, reason = decide(cfg, paths)
    except UserError as e:
        if strict:
            raise
        run, reason = True, f"cannot inspect inputs here ({e})"
    return Decision(name, run, reason)


def decide_stages(plan: Plan, strict: bool = True) -> list[Decision]:
    return [decide_stage(plan, name, strict) for name in STAGES]


def show_plan(cfgs_yaml: str, model: str, exp: str, overrides: list[str], flags: dict, as_json: bool) -> None:
    plan = make_plan(cfgs_yaml, model, exp, overrides, flags)
    stages = decide_stages(plan, strict=False)
    if as_json:
        print(json.dumps({
            "config": plan.cfg.model_dump(mode="json"),
            "layout": plan.layout.as_json(),
            "stages": [s.as_json() for s in stages],
            "paths": plan.paths.as_json(),
            "warnings": plan.report.warnings,
            "unchecked": plan.report.unchecked,
        }, allow_nan=False))  # NaN/Infinity is not JSON (the schema refuses them; this is the backstop)
        return
    lay = plan.layout
    print(f"experiment  {plan.resolved.model_name} / {plan.resolved.exp_name}  ({plan.resolved.source})")
    print(f"stage       {plan.cfg.stage}  {plan.cfg.finetuning_type}  ckpt_load_type {plan.cfg.ckpt_load_type}")
    print(f"cluster     {lay.device}: {lay.nnodes} node(s) x {lay.nproc_per_node} device(s) = world {lay.world_size}"
          f"  node_rank {lay.node_rank}  master {lay.master_addr}:{lay.master_port}  ({lay.source})")
    print(f"parallel    TP {lay.tp}  PP {lay.pp}  CP {lay.cp}  DP {lay.dp}  MBS {lay.micro_batch_size}  "
          f"GBS {lay.global_batch_size}  micro-batches/step {lay.num_microbatches}")
    for s in stages:
        print(f"{s.name:<11} {'run ' if s.run else 'skip'}  {s.reason}")
    for k, v in plan.paths.as_json().items():
        print(f"{k:<19} {v}")
    for w in plan.report.warnings:
        print(f"warning: {w}")
    if plan.report.unchecked:
        print(f"not checked ({plan.report.model_error}): {'; '.join(plan.report.unchecked)}")


def _log(msg: str) -> None:
    print(f"[ascendfactory] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def _prepare_output_dir(paths: RunPaths) -> None:
    try:
        probe_writable(paths.output_dir)
    except OSError as e:
        raise UserError(f"output_dir {paths.output_dir} is not writable ({e.strerror}); choose a writable folder")


def run_train(cfgs_yaml: str, model: str, exp: str, overrides: list[str], flags: dict) -> None:
    from ascendfactory.launch.lock import RunLock
    from ascendfactory.launch.torchrun import TrainingFailed
    from ascendfactory.modelinfo import check_trainable, config_path, read_model_facts

    plan = make_plan(cfgs_yaml, model, exp, overrides, flags)
    if plan.report.model_error:
        raise UserError(plan.report.model_error)
    facts = read_model_facts(plan.cfg.model_name_or_path)  # unsupported architecture: refuse before any work
    check_trainable(facts, str(config_path(plan.cfg.model_name_or_path)))
    _check_given_checkpoint(plan.cfg, facts.num_layers, plan.paths)
    from ascendfactory.engine.device import check_requested

    check_requested(plan.cfg.device)
    for w in plan.report.warnings:
        _log(f"warning: {w}")
    cfg, paths, layout = plan.cfg, plan.paths, plan.layout
    decide_stages(plan)  # every stage's inputs and targets are checked before any work starts
    _prepare_output_dir(paths)
    with RunLock(paths.output_dir, layout.node_rank):
        resolved = cfg.model_copy(update={"device": layout.device})
        write_text_atomic(paths.exp_config, dump_config(resolved))
        _log(f"resolved config written to {paths.exp_config}")
        for name in STAGES:
            # Decided just before running: an earlier stage may have produced what this one needs.
            decision = decide_stage(plan, name)
            if not decision.run:
                _log(f"{name}: skipped ({decision.reason})")
                continue
            if name == "export" and layout.node_rank != 0:
                _log("export: skipped on this node (node 0 exports)")
                continue
            _log(f"{name}: running ({decision.reason})")
            t0 = time.time()
            try:
                _run_stage(name, resolved, paths, layout)
            except TrainingFailed as e:
                _log(f"train: FAILED after {time.time() - t0:.1f}s: {e}")
                sys.exit(e.exit_code)
            _log(f"{name}: done in {time.time() - t0:.1f}s")
    _log(f"all stages done; outputs in {paths.output_dir}")


def _check_given_checkpoint(cfg: ExpConfig, num_layers: int, paths: RunPaths) -> None:
    """What the workers would find only after the other stages ran (and then once per torchrun attempt): the
    layers per PP stage of a given checkpoint must be the run's (its TP/PP were checked by the rules), and a
    resume needs a training checkpoint, unless auto-resume will take one of the run's own."""
    if cfg.ckpt_load_type == 0 or not cfg.user_converted_ckpt_path:
        return
    from ascendfactory.ckpt.reader import load_rank, read_checkpoint_layout, resume_problem
    from ascendfactory.layout import parse_layer_list, stage_layers

    ours = stage_layers(num_layers, cfg.pp, parse_layer_list(cfg.num_layer_list),
                        keys=("num_layer_list", "pipeline_model_parallel_size"))
    given = read_checkpoint_layout(cfg.user_converted_ckpt_path)
    if cfg.ckpt_load_type == 2 and not (cfg.train_auto_resume and ckpt_files.iterations_on_disk(paths.save_dir)):
        first = given.file(0, 0)
        if problem := resume_problem(load_rank(first), first):
            raise UserError(problem)
    theirs = list(given.layers)
    if theirs != ours:
        split = ",".join(map(str, theirs))
        raise UserError(f"user_converted_ckpt_path {cfg.user_converted_ckpt_path} splits the layers {split} over "
                        f"its pipeline stages, the run {','.join(map(str, ours))}; set num_layer_list: {split} "
                        "or convert again with the run's split")


def _run_stage(name: str, cfg: ExpConfig, paths: RunPaths, layout: RunLayout) -> None:
    from ascendfactory.convert import stage as convert_stage
    from ascendfactory.data import stage as data_stage
    from ascendfactory.launch.torchrun import run_training

    if name == "preprocess":
        data_stage.run(cfg, paths)
    elif name == "convert":
        convert_stage.run_convert(cfg, paths)
    elif name == "train":
        run_training(cfg, paths, layout)
    elif name == "export":
        convert_stage.run_export(cfg, paths)
