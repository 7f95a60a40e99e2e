"""Where a run reads and writes (SPEC.md section 4); derived from the resolved config only."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ascendfactory.ckpt import files as ckpt_files
from ascendfactory.config.schema import ExpConfig
from ascendfactory.errors import UserError


@dataclass(frozen=True)
class RunPaths:
    output_dir: Path
    processed_data_dir: Path
    converted_ckpt_dir: Path
    save_dir: Path
    hf_save_dir: Path
    logs_dir: Path

    @property
    def exp_config(self) -> Path:
        return self.output_dir / "exp-config.yaml"

    @property
    def loss_plot(self) -> Path:
        return self.output_dir / "training_loss.png"

    @property
    def lora_adapter_dir(self) -> Path:
        """A LoRA run's adapters in PEFT's format (its merged model goes to hf_save_dir)."""
        return self.output_dir / "lora_adapter"

    @property
    def best_checkpoint(self) -> Path:
        """The saved checkpoint with the lowest validation loss (export_checkpoint: best)."""
        return self.logs_dir / "best_checkpoint.json"

    @property
    def state_dir(self) -> Path:
        """What the pipeline records about the output_dir (the run lock files sit beside it, also `.ascendfactory*`)."""
        return self.output_dir / STATE_DIR

    @property
    def run_file(self) -> Path:
        """The identity of the run in this output_dir and the folders it may replace (pipeline.py writes it)."""
        return self.state_dir / "run.json"

    def as_json(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items()}


STATE_DIR = ".ascendfactory"

# Keys that do not change what is trained: where things go, logging and save knobs, the cluster.
NOT_IDENTITY = frozenset({
    "output_dir", "hf_save_dir", "scripts_dir", "mount_type", "train_auto_resume", "convert_mg2hf_at_last",
    "overwrite_output", "preprocess_workers", "save_interval", "save_total_limit", "log_interval",
    "save_grace_period", "max_restarts", "device", "nproc_per_node", "master_port",
    # evaluation reads the weights, never changes them (val_size and split do: they take training data)
    "eval_dataset", "eval_processed_data_dir", "eval_interval", "eval_iters", "export_checkpoint", "device_memory_gb",
})


def run_identity(cfg: ExpConfig) -> dict:
    """The resolved keys that define the training (model, data, layout, hyper-parameters, seed)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IDENTITY}


def run_id(cfg: ExpConfig) -> str:
    """Recorded in run.json and in every checkpoint manifest: runs of another config do not mix with it."""
    return hashlib.sha256(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def read_run_state(paths: RunPaths) -> dict | None:
    """run.json of the output_dir, None when absent (not an output_dir a run of ours has written)."""
    try:
        return json.loads(paths.run_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: still ours, with nothing recorded


def reshard_on_load(cfg: ExpConfig) -> bool:
    """ckpt_load_type 1 from a legacy user_converted_ckpt_path of another TP/PP/EP than the run's, or of another
    split of the layers over the same PP stages: the convert stage reshards its weights into the run's layout
    (convert/reshard.py) and the run loads them from there."""
    if cfg.ckpt_load_type != 1 or not cfg.user_converted_ckpt_path:
        return False
    try:
        saved = ckpt_files.saved_layout(cfg.user_converted_ckpt_path)
    except UserError:  # not a checkpoint: the rules report it
        return False
    if saved is None:
        return False
    if saved != (cfg.tp, cfg.pp, cfg.ep):
        return True
    if cfg.pp == 1:
        return False
    try:
        ours = run_split(cfg)
    except UserError:  # config.json unreadable or the split invalid: the rules report both
        return False
    return saved_split(str(cfg.user_converted_ckpt_path)) not in (None, ours)


def run_split(cfg: ExpConfig, num_layers: int | None = None) -> tuple[int, ...]:
    """The run's decoder layers per PP stage: num_layer_list, or the model's layers (config.json's, unless
    given) split evenly; UserError naming the keys when they do not fit."""
    from ascendfactory.layout import parse_layer_list, stage_layers
    from ascendfactory.modelinfo import read_model_facts

    if num_layers is None:
        num_layers = read_model_facts(cfg.model_name_or_path).num_layers
    return tuple(stage_layers(num_layers, cfg.pp, parse_layer_list(cfg.num_layer_list),
                              keys=("num_layer_list", "pipeline_model_parallel_size")))


@functools.lru_cache(maxsize=8)
def saved_split(ckpt_dir: str) -> tuple[int, ...] | None:
    """A legacy checkpoint's layers per PP stage (its rank files' keys; torch, memory-mapped), read once per run;
    None when it cannot be read (check_loadable reports it)."""
    from ascendfactory.ckpt.reader import read_checkpoint_layout

    try:
        return tuple(read_checkpoint_layout(ckpt_dir).layers)
    except UserError:
        return None


def run_paths(cfg: ExpConfig) -> RunPaths:
    out = Path(cfg.output_dir)
    layout = f"TP{cfg.tp}PP{cfg.pp}{f'EP{cfg.ep}' if cfg.ep > 1 else ''}"
    return RunPaths(
        output_dir=out,
        processed_data_dir=Path(cfg.processed_data_dir) if cfg.processed_data_dir else out / "preprocessed_data",
        converted_ckpt_dir=out / f"resharded_{layout}" if reshard_on_load(cfg)
        else Path(cfg.user_converted_ckpt_path) if cfg.user_converted_ckpt_path
        else out / f"converted_hf2mg_weight_{layout}",
        save_dir=out / "saved_checkpoints",
        hf_save_dir=Path(cfg.hf_save_dir) if cfg.hf_save_dir else out / "converted_mg2hf_weight",
        logs_dir=out / "logs",
    )
