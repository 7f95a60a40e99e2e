"""Tiny HF models of every supported family, built once per test session (shared by test_convert_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ascendfactory.families import FAMILIES as REGISTRY
from ascendfactory.tiny import make_tiny_model

# family -> make_tiny_model options, from the registry: each family's model covers another variant (Qwen2: tied
# embeddings, Qwen3: bf16 weights; Llama's tiny config has llama3 rope scaling).
FAMILIES = {fam.tiny.name: fam.tiny.tests for fam in REGISTRY}
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    if not _BUILT:
        base = tmp_path_factory.mktemp("tiny_hf")
        for family, opts in FAMILIES.items():
            _BUILT[family] = make_tiny_model(base / family, family, seed=1, **opts)
    return dict(_BUILT)
