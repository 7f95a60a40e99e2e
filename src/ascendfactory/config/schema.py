"""The one resolved experiment config: canonical lower snake_case keys, defaults from SPEC.md section 2."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The linears LoRA can adapt (megatron-core names); all of them by default, as in MindSpeed-LLM's examples.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class ExpConfig(BaseModel):
    """Everything a run needs. Unknown keys are refused before this model is built (see config.keys)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # where things are
    model_name_or_path: str
    output_dir: str
    dataset: str | None = None
    processed_data_dir: str | None = None
    user_converted_ckpt_path: str | None = None
    hf_save_dir: str | None = None  # default ${output_dir}/converted_mg2hf_weight
    scripts_dir: str | None = None  # default: the shipped scripts_modellink/
    mount_type: str = "OBS"

    # what to train
    stage: str = "sft"  # pt | sft (checked by the rules, so every problem is reported together)
    finetuning_type: Literal["full", "lora"] = "full"
    ckpt_load_type: int = 1  # 0 random init | 1 weights only | 2 full resume
    # finetuning_type lora (MindSpeed-LLM's --lora-r / --lora-alpha / --lora-target-modules)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0
    train_auto_resume: bool = False
    trust_checkpoint: bool = False  # unpickle checkpoint files in full: runs code from them
    convert_mg2hf_at_last: bool = True

    # data
    handler_name: str = "AlpacaStyleInstructionHandler"
    prompt_type: str = "auto"
    pack: bool = False
    append_eod: bool = True
    json_keys: list[str] = Field(default_factory=lambda: ["text"])
    map_keys: dict[str, Any] | None = None
    skip_bad_records: bool = False
    preprocess_workers: int = 1

    # parallel layout
    tensor_model_parallel_size: int = 8
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    num_layer_list: str | None = None

    # batch and length
    micro_batch_size: int = 4
    global_batch_size: int = 512
    seq_len: int = 4096
    max_pe: int = 8192
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    # optimisation
    train_iters: int | None = 100
    epochs: float | None = None
    lr: float = 2.5e-5
    min_lr: float = 2.5e-6
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    seed: int = 1234
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    make_vocab_size_divisible_by: int | None = None

    # saving and logging
    save_interval: int = 1000
    save_total_limit: int = 0
    log_interval: int = 1
    save_grace_period: float = 60.0
    max_restarts: int = 3

    # cluster
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    nproc_per_node: int | None = None
    master_port: int = 29500

    # passed through to the trainer untouched
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v):
        # MindSpeed-LLM writes them space-separated on its command line; commas are accepted too
        v = v.replace(",", " ").split() if isinstance(v, str) else v
        return list(LORA_TARGETS) if v == ["all"] else v  # LLaMA-Factory's `lora_target: all`

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def cp(self) -> int:
        return self.context_parallel_size


CANONICAL_KEYS = tuple(ExpConfig.model_fields)
