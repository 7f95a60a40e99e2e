"""ascendfactory: one-command LLM training on megatron-core (Ascend NPU, GPU, CPU)."""

__version__ = "0.1.0"
