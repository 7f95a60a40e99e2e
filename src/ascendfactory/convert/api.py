"""Public entry points of the converter: the two CLI commands and the library functions they wrap.

    hf_to_megatron(hf_dir, mg_dir, tp, pp, ..., ep=1)  HF safetensors -> Megatron TP/PP(/EP) shards
    megatron_to_hf(mg_dir, hf_dir, hf_config_dir, ...) Megatron checkpoint (converted or trained) -> HF
    read_checkpoint_layout(mg_dir, iteration=None)     TP/PP/EP/layers/source/padded vocab of a Megatron folder
    verify_conversion(hf_dir, mg_dir, ...)             HF vs megatron-core logits, raises on a mismatch
    export_peft_adapter(mg_dir, out_dir, hf_config_dir) a LoRA checkpoint's adapters as a PEFT adapter folder
"""

from __future__ import annotations

from ascendfactory.ckpt.reader import CheckpointLayout, read_checkpoint_layout
from ascendfactory.convert.hf2mg import hf_to_megatron
from ascendfactory.convert.mg2hf import DEFAULT_SHARD_SIZE, megatron_to_hf
from ascendfactory.convert.options import dtype_name
from ascendfactory.convert.peft_adapter import export_peft_adapter
from ascendfactory.convert.verify import VerificationFailed, verify_conversion

__all__ = ["hf_to_megatron", "megatron_to_hf", "read_checkpoint_layout", "CheckpointLayout", "verify_conversion",
           "VerificationFailed", "export_peft_adapter", "hf2mg_command", "mg2hf_command"]


def hf2mg_command(hf_dir, mg_dir, tp=1, pp=1, num_layer_list=None, dtype=None, make_vocab_size_divisible_by=None,
                  verify=False, ep=1) -> None:
    hf_to_megatron(hf_dir, mg_dir, tp, pp, num_layer_list, dtype, make_vocab_size_divisible_by, ep=ep)
    if verify:
        verify_conversion(hf_dir, mg_dir, dtype=dtype_name(dtype))


def mg2hf_command(mg_dir, hf_dir, hf_config_dir, iteration=None, dtype=None, shard_size=DEFAULT_SHARD_SIZE,
                  verify=False, peft_dir=None) -> None:
    if peft_dir:  # first: a checkpoint without adapters is refused before any work
        export_peft_adapter(mg_dir, peft_dir, hf_config_dir, iteration)
    megatron_to_hf(mg_dir, hf_dir, hf_config_dir, iteration, dtype, shard_size)
    if verify:
        verify_conversion(hf_dir, mg_dir, iteration, dtype=dtype_name(dtype))
