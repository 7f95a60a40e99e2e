"""Tiny HF models of every supported family, built once per test session (shared by test_convert_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ascendfactory.tiny import make_tiny_model

# family -> make_tiny_model options: tied embeddings (Qwen2 small sizes), bf16 weights, llama3 rope scaling.
FAMILIES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"dtype": "bfloat16"},
    "mistral": {},
}
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    if not _BUILT:
        base = tmp_path_factory.mktemp("tiny_hf")
        for family, opts in FAMILIES.items():
            _BUILT[family] = make_tiny_model(base / family, family, seed=1, **opts)
    return dict(_BUILT)
