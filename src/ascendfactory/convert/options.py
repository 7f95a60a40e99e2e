"""What a conversion writes besides its shard plan: the tensors' dtype, and the iteration number of converted
weights. No torch at import (`plan` reads the dtype names)."""

from __future__ import annotations

from ascendfactory.errors import UserError

ITERATION = 1  # converted weights are saved as iteration 1 (SPEC.md section 6)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def dtype_name(dtype: str | None, flag: str = "--dtype") -> str | None:
    """Canonical bf16|fp16|fp32 (None stays None = keep the source dtype)."""
    if dtype is None:
        return None
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d not in DTYPES:
        raise UserError(f"{flag}: unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return d


def torch_dtype(name: str | None, default=None):
    """The torch dtype of a canonical name; `default` for None (keep the source dtype)."""
    if name is None:
        return default
    import torch  # here, not at the top: `plan` imports this module and must not load torch

    return getattr(torch, DTYPES[name])
