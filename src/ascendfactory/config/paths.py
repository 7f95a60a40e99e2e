"""Where a run reads and writes (SPEC.md section 4); derived from the resolved config only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ascendfactory.config.schema import ExpConfig


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
    def lora_adapter_dir(self) -> Path:
        """A LoRA run's adapters in PEFT's format (its merged model goes to hf_save_dir)."""
        return self.output_dir / "lora_adapter"

    def as_json(self) -> dict:
        return {k: str(v) for k, v in self.__dict__.items()}


def run_paths(cfg: ExpConfig) -> RunPaths:
    out = Path(cfg.output_dir)
    return RunPaths(
        output_dir=out,
        processed_data_dir=Path(cfg.processed_data_dir) if cfg.processed_data_dir else out / "preprocessed_data",
        converted_ckpt_dir=Path(cfg.user_converted_ckpt_path)
        if cfg.user_converted_ckpt_path
        else out / f"converted_hf2mg_weight_TP{cfg.tp}PP{cfg.pp}{f'EP{cfg.ep}' if cfg.ep > 1 else ''}",
        save_dir=out / "saved_checkpoints",
        hf_save_dir=Path(cfg.hf_save_dir) if cfg.hf_save_dir else out / "converted_mg2hf_weight",
        logs_dir=out / "logs",
    )
