"""The one resolved experiment config: canonical lower snake_case keys, defaults from SPEC.md section 2."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Value ranges live here (Field constraints), so every key is checked once, before any stage, and reported as
# one line naming the key (loader._type_problems). Cross-field and cluster rules live in config.rules.
Size = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)

# The linears LoRA can adapt (megatron-core names); all of them by default, as in MindSpeed-LLM's examples.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

# The dataset handlers and chat templates a config may name (data/handlers.py, data/templates.py implement them).
PRETRAIN = "GeneralPretrainHandler"
INSTRUCTION_HANDLERS = (
    "AlpacaStyleInstructionHandler",
    "SharegptStyleInstructionHandler",
    "OpenAIStyleInstructionHandler",
    "GeneralInstructionHandler",
    "MOSSInstructionHandler",
)
HANDLERS = (PRETRAIN,) + INSTRUCTION_HANDLERS
PROMPT_TYPES = ("auto", "qwen", "llama3", "llama2", "mistral", "empty", "chatglm3", "glm4")


class ExpConfig(BaseModel):
    """Everything a run needs. Unknown keys are refused before this model is built (see config.keys)."""

    # allow_inf_nan: a NaN lr would train nothing, and NaN/Infinity is not JSON (`plan --json`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # where things are
    model_name_or_path: str
    output_dir: str
    dataset: str | None = None
    processed_data_dir: str | None = None
    user_converted_ckpt_path: str | None = None
    hf_save_dir: str | None = None  # default ${output_dir}/converted_mg2hf_weight
    scripts_dir: str | None = None  # default: the shipped scripts_modellink/
    mount_type: str = "OBS"
    overwrite_output: bool = False  # write into an output_dir / hf_save_dir that no run of this output_dir made

    # what to train
    stage: str = "sft"  # pt | sft (checked by the rules, so every problem is reported together)
    finetuning_type: Literal["full", "lora"] = "full"
    ckpt_load_type: int = 1  # 0 random init | 1 weights only | 2 full resume
    # finetuning_type lora (MindSpeed-LLM's --lora-r / --lora-alpha / --lora-target-modules)
    lora_r: Size = 16
    lora_alpha: float = Field(32.0, gt=0)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: Fraction = 0.0
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
    preprocess_workers: Size = 1
    max_record_mb: float = Field(16, gt=0, allow_inf_nan=False)  # a longer record is a bad record

    # parallel layout
    tensor_model_parallel_size: Size = 8
    pipeline_model_parallel_size: Size = 1
    context_parallel_size: Size = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    num_layer_list: str | None = None
    expert_model_parallel_size: int = 1  # MoE: experts split over EP ranks (MindSpeed-LLM's --expert-model-...)

    # Mixture-of-Experts (SPEC.md section 8); ignored for dense models
    moe_aux_loss_coeff: float | None = None  # load-balancing loss weight; None: config.json's router_aux_loss_coef
    moe_token_dispatcher_type: Literal["auto", "allgather", "alltoall"] = "auto"  # auto: alltoall on hccl / nccl
    moe_grouped_gemm: bool | Literal["auto"] = "auto"  # GroupedMLP or SequentialMLP: engine/moe.py

    # batch and length
    micro_batch_size: Size = 4
    global_batch_size: Size = 512
    seq_len: Size = 4096
    max_pe: Size = 8192
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    # optimisation
    train_iters: int | None = 100  # <= 0 is allowed with `epochs` (checked by the rules)
    epochs: float | None = Field(None, gt=0)
    lr: NonNegative = 2.5e-5
    min_lr: NonNegative = 2.5e-6
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_fraction: float | None = Field(None, ge=0, le=1)
    lr_warmup_iters: int = Field(0, ge=0)
    weight_decay: NonNegative = 0.0
    clip_grad: NonNegative = 1.0  # 0: no clipping
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.95
    adam_eps: float = Field(1e-8, gt=0)
    seed: int = Field(1234, ge=0, le=2**31 - 1)  # numpy seeds are 32-bit; the trainer adds rank offsets
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    make_vocab_size_divisible_by: int | None = Field(None, ge=1)

    # saving and logging
    save_interval: Size = 1000
    save_total_limit: int = 0  # 0 / negative: keep all
    ckpt_format: Literal["legacy", "torch_dist"] = "legacy"  # torch_dist: megatron-core dist_checkpointing
    async_save: bool = False  # torch_dist: shards written in the background (megatron-core's async save)
    log_interval: Size = 1
    save_grace_period: NonNegative = 60.0
    max_restarts: int = Field(3, ge=0)

    # validation and memory (SPEC.md section 10)
    val_size: int | float = Field(0, ge=0)  # a fraction < 1 of the training data, or a whole number of samples
    split: str | None = None  # pretraining: Megatron's "train,valid,test" weights, e.g. "98,2,0"
    eval_dataset: str | None = None  # raw validation data, preprocessed like `dataset`
    eval_processed_data_dir: str | None = None
    eval_interval: Size | None = None  # default: save_interval
    eval_iters: Size | None = None  # default: the whole validation set when small, else 10 global batches
    export_checkpoint: Literal["last", "best"] = "last"
    device_memory_gb: float | None = Field(None, gt=0)  # for plan's estimate when the device cannot be queried

    # cluster
    device: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    nproc_per_node: int | None = Field(None, ge=1)
    master_port: int = Field(29500, ge=1, le=65535)

    # passed through to the trainer untouched
    extra_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        # pydantic takes true as 1: a bare `--seq_len` (which means true) must not become seq_len 1
        if isinstance(v, bool) and info.field_name in NUMERIC_KEYS:
            raise ValueError("must be a number, not true/false (a bare --key means true; write --key=value)")
        return v

    @field_validator("extra_args", "map_keys")
    @classmethod
    def _finite_values(cls, v, info):
        # passed on untouched, so not typed: refuse NaN/Infinity here (the trainer's flags, `plan --json`)
        if (where := _non_finite(v, info.field_name)) is not None:
            raise ValueError(f"{where} is not a finite number; write a number")
        return v

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

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size


CANONICAL_KEYS = tuple(ExpConfig.model_fields)


def _types(annotation) -> set:
    args = get_args(annotation)
    return set().union(*map(_types, args)) if args else {annotation}


# Keys typed as numbers (not bool): true/false there is a mistake, not 1/0.
NUMERIC_KEYS = frozenset(k for k, f in ExpConfig.model_fields.items()
                         if {int, float} & _types(f.annotation) and bool not in _types(f.annotation))


def _non_finite(value, path: str) -> str | None:
    """The dotted path of the first NaN/Infinity inside a nested value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (where := _non_finite(v, f"{path}.{k}")) is not None:
            return where
    return None


def allowed_range(key: str) -> str | None:
    """A key's Field bounds as text: `>= 1`, `in [0, 1)`; None when it has none."""
    bounds = {name: getattr(m, name) for m in ExpConfig.model_fields[key].metadata
              for name in ("ge", "gt", "le", "lt") if getattr(m, name, None) is not None}
    lo = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
    hi = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return None
