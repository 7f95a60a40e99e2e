"""Fixtures shared across test modules."""

from _convert_models import tiny_models  # noqa: F401  (session fixture: one tiny HF model per family)
