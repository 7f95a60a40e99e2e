"""The `train` pipeline: preprocess -> convert -> train -> export, each skipped when its output is complete
or not needed, with the reason printed (and shown by `plan`)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.ckpt import files as ckpt_files
from ascendfactory.config import rules
from ascendfactory.config.loader import Resolved, dump_config, resolve
from ascendfactory.config.moe_rules import choose_experts, grouped_resume_problem
from ascendfactory.config.paths import (
    STATE_DIR,
    RunPaths,
    read_run_state,
    reshard_on_load,
    run_id,
    run_identity,
    run_paths,
    run_split,
    saved_split,
)
from ascendfactory.config.schema import ExpConfig
from ascendfactory.engine.training_math import config_problems as engine_problems
from ascendfactory.errors import UserError, UserErrors
from ascendfactory.fsutil import probe_writable, write_text_atomic
from ascendfactory.launch.cluster import cluster_layout
from ascendfactory.launch.torchrun import config_problems as launch_problems
from ascendfactory.layout import RunLayout
from ascendfactory.logs import RUN
from ascendfactory.modelinfo import ModelFacts

log = logging.getLogger(RUN)
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


def _train_complete(cfg: ExpConfig, done: int | None) -> bool:
    # With `epochs` the iteration count is derived by the trainer from the data, so it is not known here.
    return done is not None and cfg.epochs is None and bool(cfg.train_iters) and done >= cfg.train_iters


def decide_train(cfg: ExpConfig, paths: RunPaths) -> tuple[bool, str]:
    done, distrust = _tracker_iteration(paths.save_dir)
    if _train_complete(cfg, done):
        return False, f"complete: {paths.save_dir} holds iteration {done} of {cfg.train_iters}"
    iters = f"{cfg.train_iters} iterations" if cfg.epochs is None else f"{cfg.epochs} epoch(s)"
    if cfg.finetuning_type == "lora":
        iters += f" of LoRA (r {cfg.lora_r} on {', '.join(cfg.lora_target_modules)})"
    if distrust:
        iters += f" (tracker ignored: {distrust})"
    if cfg.train_auto_resume and ckpt_files.iterations_on_disk(paths.save_dir):
        return True, f"{iters}, auto-resume from the newest valid checkpoint in {paths.save_dir}"
    source = {
        0: "random init (ckpt_load_type 0)",
        1: f"weights from {paths.converted_ckpt_dir} (ckpt_load_type 1: fresh optimizer, iteration 0)",
        2: f"full resume from {paths.converted_ckpt_dir} (ckpt_load_type 2)",
    }.get(cfg.ckpt_load_type, "?")
    return True, f"{iters}, {source}{_given_checkpoint(cfg)}"


def _given_checkpoint(cfg: ExpConfig) -> str:
    """user_converted_ckpt_path's format and layout, and whether it is resharded into the run's (plan shows it)."""
    if cfg.ckpt_load_type == 0 or not cfg.user_converted_ckpt_path:
        return ""
    try:
        saved = ckpt_files.saved_layout(cfg.user_converted_ckpt_path)
    except UserError:  # the rules report it
        return ""
    if saved is None:
        return "; a torch_dist checkpoint: megatron-core reshards it into the run's layout on load"
    tp, pp, ep = saved
    given = f"; a legacy checkpoint at TP{tp} PP{pp}{f' EP{ep}' if ep > 1 else ''}"
    if reshard_on_load(cfg):
        if saved == (cfg.tp, cfg.pp, cfg.ep):  # the layers split otherwise over the same stages
            given += (f" with layers per stage {list(saved_split(str(cfg.user_converted_ckpt_path)))} (the run's: "
                      f"{list(run_split(cfg))})")
        return f"{given}, resharded by the convert stage from {cfg.user_converted_ckpt_path}"
    return f"{given}, the run's layout: no resharding"


def _tracker_iteration(save_dir: Path) -> tuple[int | None, str]:
    """The iteration the tracker names when that checkpoint is complete; otherwise None and, for a tracker that
    is there, why it is not believed (training then runs instead of reporting "complete")."""
    if not (save_dir / ckpt_files.TRACKER).exists():
        return None, ""
    try:
        it = ckpt_files.read_tracker(save_dir)
    except UserError as e:
        return None, str(e)
    if problem := ckpt_files.problem_of(save_dir / ckpt_files.iter_dir_name(it), require_manifest=True):
        return None, f"{save_dir / ckpt_files.TRACKER} names iteration {it}, but {problem}"
    return it, ""


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


def check_outputs(plan: Plan) -> None:
    """Nothing of the user's is replaced, deleted or written through, and runs do not mix: every problem
    together, before any stage (train and plan)."""
    cfg, paths = plan.cfg, plan.paths
    problems = [*_foreign_output_dir(cfg, paths), *_links_out_of_output_dir(paths), *_target_problems(cfg, paths)]
    if problem := _earlier_run(cfg, paths):
        problems.append(problem)
    if problems:
        raise UserErrors(problems)


def _foreign_output_dir(cfg: ExpConfig, paths: RunPaths) -> list[str]:
    """An output_dir with files in it but no run.json is the user's folder (exp-config.yaml, logs/ ... would be
    overwritten or appended to)."""
    if cfg.overwrite_output or not paths.output_dir.is_dir():
        return []
    # The state folder and the run lock files (`.ascendfactory*`) are ours.
    theirs = sorted(p.name for p in paths.output_dir.iterdir() if not p.name.startswith(STATE_DIR))
    # Read after listing: a run writes run.json before anything else, so another node's files come with it.
    if not theirs or read_run_state(paths) is not None:
        return []
    shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
    return [f"output_dir {paths.output_dir}: holds files that no ascendfactory run wrote ({shown}); choose a new or "
            "empty output_dir, or set overwrite_output: true (--overwrite) to write into it"]


def _links_out_of_output_dir(paths: RunPaths) -> list[str]:
    """Files the run writes or deletes must not be symbolic links leading out of output_dir."""
    root = paths.output_dir.resolve()
    links = [p for p in (paths.exp_config, paths.loss_plot, paths.state_dir, paths.logs_dir, paths.save_dir)
             if p.is_symlink()]
    for d in (paths.state_dir, paths.logs_dir, paths.save_dir):
        if d.is_dir() and not d.is_symlink():
            for parent, dirs, files in os.walk(d):  # not into linked folders: they are listed, and checked
                links += [p for n in dirs + files if (p := Path(parent) / n).is_symlink()]
    problems = []
    for link in links:
        try:
            target = link.resolve()
        except RuntimeError:  # a loop of links: refused like one leading out
            target = None
        if target is None or (target != root and root not in target.parents):
            problems.append(f"{link}: a symbolic link to {os.readlink(link)}, outside output_dir {paths.output_dir}, "
                            "and the run writes there; remove the link or choose another output_dir")
    return problems


def _replaced_targets(cfg: ExpConfig, paths: RunPaths) -> list[tuple[str, Path, str]]:
    """The folders the pipeline replaces as a whole: (how errors name it, path, the key that moves it)."""
    out = []
    if cfg.ckpt_load_type != 0 and not cfg.user_converted_ckpt_path:
        out.append(("converted checkpoint dir", paths.converted_ckpt_dir, "output_dir"))
    elif reshard_on_load(cfg):
        out.append(("resharded checkpoint dir", paths.converted_ckpt_dir, "output_dir"))
    if cfg.convert_mg2hf_at_last:
        out.append(("hf_save_dir", paths.hf_save_dir, "hf_save_dir"))
        if cfg.finetuning_type == "lora":
            out.append(("lora adapter dir", paths.lora_adapter_dir, "output_dir"))
    return out


def _target_problems(cfg: ExpConfig, paths: RunPaths) -> list[str]:
    """A replaced folder is never an input, output_dir or one of its folders, nor anything above them; one that
    holds something is replaced only when a run of this output_dir made it (run.json) or with overwrite_output."""
    from ascendfactory.convert.target import ours

    kept = {"model_name_or_path": cfg.model_name_or_path, "user_converted_ckpt_path": cfg.user_converted_ckpt_path,
            "dataset": cfg.dataset, "processed_data_dir": paths.processed_data_dir, "output_dir": paths.output_dir,
            "saved_checkpoints": paths.save_dir, "logs": paths.logs_dir}
    made = set((read_run_state(paths) or {}).get("made", []))
    problems = []
    for name, target, key in _replaced_targets(cfg, paths):
        t = target.resolve()
        hit = next((k for k, p in kept.items() if p and (t == Path(p).resolve() or t in Path(p).resolve().parents)),
                   None)
        if hit:
            problems.append(f"{name} {target}: replacing it would replace {hit} {kept[hit]}; choose another {key}")
            continue
        try:
            marker = ours(target, name)  # content that is no conversion of ours is refused whatever the settings
        except UserError as e:
            problems.append(str(e))
            continue
        if marker is not None and str(t) not in made and not cfg.overwrite_output:
            problems.append(f"{name} {target}: holds a conversion (of {marker.get('source')}) that no run in "
                            f"output_dir {paths.output_dir} made; choose another {key}, or set overwrite_output: true "
                            "to replace it")
    return problems


def _earlier_run(cfg: ExpConfig, paths: RunPaths) -> str | None:
    """A fresh run (no auto-resume) among an earlier run's checkpoints would start over beside them (and a torchrun
    restart or save_total_limit would see both); only that very run, finished, is at home there (train skipped)."""
    its = ckpt_files.iterations_on_disk(paths.save_dir)
    if cfg.train_auto_resume or not its:
        return None
    done, _ = _tracker_iteration(paths.save_dir)
    if _train_complete(cfg, done) and ckpt_files.manifest_run_id(
            paths.save_dir / ckpt_files.iter_dir_name(done)) == run_id(cfg):
        return None
    names = ", ".join(map(ckpt_files.iter_dir_name, its[:3])) + (f" and {len(its) - 3} more" if len(its) > 3 else "")
    return (f"{paths.save_dir}: holds checkpoints of an earlier run ({names}) and train_auto_resume is false, so "
            "this run would start over among them; set train_auto_resume: true to continue from them, or choose "
            "another output_dir")


@dataclass
class Foresight:
    """What `plan` and `train` tell before any stage: the validation set and the memory estimate."""

    validation: dict
    memory: object  # memory.Estimate, or None where the model or the layout is not known
    model_shape: str  # where the model's shape came from, or why it is not known
    device_memory: int | None
    device_memory_source: str | None

    @property
    def memory_warning(self) -> str | None:
        from ascendfactory.memory import over_memory_warning

        return over_memory_warning(self.memory, self.device_memory, self.device_memory_source) if self.memory \
            else None


def foresee(plan: Plan) -> Foresight:
    """UserError when val_size leaves no training data (known once the data is preprocessed)."""
    from ascendfactory import memory, validation
    from ascendfactory.data.stage import find_data_prefix

    cfg = plan.cfg
    try:
        prefix = find_data_prefix(plan.paths.processed_data_dir, cfg.stage)
    except UserError:  # not preprocessed yet (the trainer checks then), or a problem the stages report
        prefix = None
    try:
        estimate, shape = memory.for_run(cfg, plan.layout, plan.resolved.model_name)
    except UserError as e:  # model files not here, nor a known model name
        estimate, shape = None, str(e)
    device_bytes, source = memory.device_memory(cfg, plan.layout.device)
    return Foresight(validation.describe(cfg, prefix), estimate, shape, device_bytes, source)


def show_plan(cfgs_yaml: str, model: str, exp: str, overrides: list[str], flags: dict, as_json: bool) -> None:
    from ascendfactory import memory, validation

    plan = make_plan(cfgs_yaml, model, exp, overrides, flags)
    check_outputs(plan)
    stages = decide_stages(plan, strict=False)
    ahead = foresee(plan)
    if ahead.memory_warning:
        plan.report.warnings.append(ahead.memory_warning)
    if as_json:
        print(json.dumps({
            "config": plan.cfg.model_dump(mode="json"),
            "layout": plan.layout.as_json(),
            "stages": [s.as_json() for s in stages],
            "paths": plan.paths.as_json(),
            "validation": ahead.validation,
            "memory": ahead.memory.as_json() if ahead.memory else None,
            "device_memory": ahead.device_memory,
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
          f"GBS {lay.global_batch_size}  micro-batches/step {lay.num_microbatches}  EP {lay.ep}  "
          f"expert-DP {lay.expert_dp}")
    for s in stages:
        print(f"{s.name:<11} {'run ' if s.run else 'skip'}  {s.reason}")
    print(f"validation  {validation.describe_line(ahead.validation)}")
    print(f"memory      {memory.summary_line(ahead.memory, ahead.device_memory, ahead.device_memory_source)}; "
          f"model shape from {ahead.model_shape}" if ahead.memory else f"memory      unknown ({ahead.model_shape})")
    for k, v in plan.paths.as_json().items():
        print(f"{k:<19} {v}")
    for w in plan.report.warnings:
        print(f"warning: {w}")
    if plan.report.unchecked:
        print(f"not checked ({plan.report.model_error}): {'; '.join(plan.report.unchecked)}")


def _prepare_output_dir(paths: RunPaths) -> None:
    try:
        probe_writable(paths.state_dir)
    except OSError as e:
        raise UserError(f"output_dir {paths.output_dir} is not writable ({e.strerror}); choose a writable "
                        "folder") from None


def _record_run(cfg: ExpConfig, paths: RunPaths) -> None:
    """run.json, written before anything else in output_dir: the run's identity, and the folders it may replace
    from now on (check_outputs accepted each: absent, empty, made here before, or overwrite_output)."""
    made = set((read_run_state(paths) or {}).get("made", []))
    made |= {str(target.resolve()) for _, target, _ in _replaced_targets(cfg, paths)}
    state = {"run_id": run_id(cfg), "identity": run_identity(cfg), "made": sorted(made)}
    ckpt_files.write_text_atomic(paths.run_file, json.dumps(state, indent=1, sort_keys=True))


def run_train(cfgs_yaml: str, model: str, exp: str, overrides: list[str], flags: dict) -> None:
    from ascendfactory.launch.lock import RunLock
    from ascendfactory.launch.torchrun import TrainingFailed
    from ascendfactory.modelinfo import check_trainable, config_path, read_model_facts

    plan = make_plan(cfgs_yaml, model, exp, overrides, flags)
    if plan.report.model_error:
        raise UserError(plan.report.model_error)
    facts = read_model_facts(plan.cfg.model_name_or_path)  # unsupported architecture: refuse before any work
    check_trainable(facts, str(config_path(plan.cfg.model_name_or_path)))
    if plan.cfg.trust_checkpoint or "ascendfactory.ckpt.reader" in sys.modules:
        # Before the first checkpoint file is read. The reader imports torch (seconds), so a run that reads no
        # checkpoint here (the stages that do import it later) is not made to wait for it: its default is off.
        from ascendfactory.ckpt.reader import trust_checkpoints

        trust_checkpoints(plan.cfg.trust_checkpoint)
    _check_given_checkpoint(plan.cfg, facts, plan.paths, plan.layout.device)
    from ascendfactory.engine.device import check_requested

    check_requested(plan.cfg.device)
    for w in plan.report.warnings:
        log.info(f"warning: {w}")
    _tell_ahead(foresee(plan))
    cfg, paths, layout = plan.cfg, plan.paths, plan.layout
    check_outputs(plan)
    decide_stages(plan)  # every stage's inputs and targets are checked before any work starts
    _prepare_output_dir(paths)
    with RunLock(paths.output_dir, layout.node_rank):
        _record_run(cfg, paths)
        resolved = cfg.model_copy(update={"device": layout.device})
        write_text_atomic(paths.exp_config, dump_config(resolved))
        log.info(f"resolved config written to {paths.exp_config}")
        for name in STAGES:
            # Decided just before running: an earlier stage may have produced what this one needs.
            decision = decide_stage(plan, name)
            if not decision.run:
                log.info(f"{name}: skipped ({decision.reason})")
                continue
            if name == "export" and layout.node_rank != 0:
                log.info("export: skipped on this node (node 0 exports)")
                continue
            log.info(f"{name}: running ({decision.reason})")
            t0 = time.time()
            try:
                _run_stage(name, resolved, paths, layout)
            except TrainingFailed as e:
                log.info(f"train: FAILED after {time.time() - t0:.1f}s: {e}")
                sys.exit(e.exit_code)
            log.info(f"{name}: done in {time.time() - t0:.1f}s")
    log.info(f"all stages done; outputs in {paths.output_dir}")


def _tell_ahead(ahead: Foresight) -> None:
    from ascendfactory import memory, validation

    log.info(f"validation: {validation.describe_line(ahead.validation)}")
    if ahead.memory:
        summary = memory.summary_line(ahead.memory, ahead.device_memory, ahead.device_memory_source)
        log.info(f"memory estimate: {summary}")
    if ahead.memory_warning:
        log.info(f"warning: {ahead.memory_warning}")


def _check_given_checkpoint(cfg: ExpConfig, facts: ModelFacts, paths: RunPaths, device: str) -> None:
    """What the workers would find only after the other stages ran (and then once per torchrun attempt): the
    layers per PP stage of a given checkpoint must be the run's (its TP/PP were checked by the rules), and a
    resume needs a training checkpoint whose experts' implementation is the run's, unless auto-resume will take
    one of the run's own."""
    if cfg.ckpt_load_type == 0 or not cfg.user_converted_ckpt_path:
        return
    from ascendfactory.ckpt.reader import read_checkpoint_layout

    ours = list(run_split(cfg, facts.num_layers))
    given = read_checkpoint_layout(cfg.user_converted_ckpt_path)
    if cfg.ckpt_load_type == 2 and not (cfg.train_auto_resume and ckpt_files.iterations_on_disk(paths.save_dir)):
        if problem := given.resume_problem():
            raise UserError(problem)
        if facts.num_experts and (problem := grouped_resume_problem(
                bool(given.args().get("moe_grouped_gemm")), choose_experts(cfg, device)[0],
                f"user_converted_ckpt_path {cfg.user_converted_ckpt_path}")):
            raise UserError(problem)
    if given.format == "torch_dist" or reshard_on_load(cfg):
        return  # loaded into any layout by megatron-core / resharded into the run's by the convert stage
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
