"""Key spellings: every form the docs use maps to one canonical lower snake_case key."""

from __future__ import annotations

import difflib

from ascendfactory.config.schema import CANONICAL_KEYS

# Spellings that are not just case / hyphen variants of the canonical key.
ALIASES = {
    "scirpts_dir": "scripts_dir",  # the docs' own misspelling
    "seq_length": "seq_len",
    "max_position_embeddings": "max_pe",
    "template": "prompt_type",
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "cp": "context_parallel_size",
    "ep": "expert_model_parallel_size",
    "mbs": "micro_batch_size",
    "gbs": "global_batch_size",
    "nproc": "nproc_per_node",
    "num_train_epochs": "epochs",
    "lora_rank": "lora_r",  # LLaMA-Factory's names
    "lora_target": "lora_target_modules",
    "overwrite": "overwrite_output",  # `train ... --overwrite`
}

# Keys whose value is a mapping that belongs to the key (not an experiment block or a group).
MAPPING_KEYS = frozenset({"extra_args", "map_keys"})

# Groups a dotted command-line override may name even when the YAML does not have them (SPEC.md section 1).
GROUPS = frozenset({"backend_config"})


def normalize(key: str) -> str:
    """`micro-batch-size`, `MICRO_BATCH_SIZE`, `scirpts_dir` -> their canonical key (unchecked)."""
    k = str(key).strip().lower().replace("-", "_")
    return ALIASES.get(k, k)


def is_known(key: str) -> bool:
    return normalize(key) in CANONICAL_KEYS


def suggestion(key: str) -> str:
    """' (did you mean `x`?)' or ''."""
    close = difflib.get_close_matches(normalize(key), CANONICAL_KEYS, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
