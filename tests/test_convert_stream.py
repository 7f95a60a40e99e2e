"""Streamed rank files (ckpt.torchfile): the bytes torch.save writes, written one tensor at a time, and hf2mg's
memory not growing with the experts a rank file holds."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import pytest
import torch

from ascendfactory.ckpt.torchfile import Planned, TorchFileWriter
from ascendfactory.convert.api import hf_to_megatron
from ascendfactory.tiny import make_tiny_model


def _planned(obj, tensors: list):
    """obj with its tensors replaced by Planned ones (collected in pickling order)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return Planned(obj.shape, obj.dtype)
    if isinstance(obj, dict):
        return {k: _planned(v, tensors) for k, v in obj.items()}
    return obj


def streamed(obj, pieces: int = 1) -> bytes:
    """obj written by TorchFileWriter, each tensor in `pieces` consecutive row ranges where it has rows."""
    tensors: list[torch.Tensor] = []
    buf = io.BytesIO()
    with TorchFileWriter(buf, _planned(obj, tensors)) as w:
        for t in tensors:
            w.write(*(t.reshape(-1).tensor_split(pieces) if t.dim() else [t]))
    return buf.getvalue()


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _args() -> dict:
    return {"tensor_model_parallel_size": 2, "num_layer_list": None, "source_model": "/m", "architecture": "X",
            "padded_vocab_size": 512, "dtype": "bf16"}


STATES = {
    "dense": lambda: {"args": _args(), "checkpoint_version": 3.0, "iteration": 1, "model": {
        "embedding.word_embeddings.weight": torch.randn(64, 16).bfloat16(),
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(48, 16),
        "decoder.layers.0.self_attention.linear_qkv.bias": torch.randn(48).half(),
        "decoder.final_layernorm.weight": torch.randn(16)}},
    "moe": lambda: {"args": _args(), "checkpoint_version": 3.0, "iteration": 1, "model": {
        "decoder.layers.0.mlp.router.weight": torch.randn(8, 16),
        **{f"decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc{k}.weight": torch.randn(32, 16).bfloat16()
           for i in range(8) for k in (1, 2)}}},
    # training-save extras: a Namespace, nested containers, ints and bools, a 0-d, an empty tensor, and data that
    # starts like a zip data descriptor (which torch's writer folds into its serialization id)
    "extras": lambda: {"args": argparse.Namespace(tp=2, lr=1e-4, name="x", layers=[1, 2]), "rng": (1, 2.5, None),
                       "model": {"step": torch.tensor(7), "mask": torch.ones(3, dtype=torch.bool),
                                 "ids": torch.arange(10), "empty": torch.empty(0, 4),
                                 "pk": torch.tensor([0x50, 0x4B, 7, 8, 1, 2, 3, 4, 5], dtype=torch.uint8)}},
}


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("pieces", [1, 3])
def test_writer_bytes_equal_torch_save(state, pieces):
    obj = STATES[state]()
    assert streamed(obj, pieces) == saved(obj)
    loaded = torch.load(io.BytesIO(streamed(obj, pieces)), weights_only=False)
    for k, v in obj["model"].items():
        assert torch.equal(loaded["model"][k], v), k


def test_writer_refuses_what_was_not_planned():
    planned = {"a": Planned((2, 3), torch.float32)}
    with pytest.raises(ValueError, match="wrote 0 of 1"), TorchFileWriter(io.BytesIO(), planned) as w:
        with pytest.raises(ValueError, match="do not make the planned"):
            w.write(torch.zeros(2, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("family, tp, pp, ep, dtype", [("qwen2", 2, 2, 1, None), ("qwen3_moe", 2, 2, 2, "bf16")])
def test_hf2mg_rank_files_are_torch_save_bytes(tmp_path, family, tp, pp, ep, dtype):
    """Every rank file equals torch.save of what it holds, as hf2mg wrote it before streaming."""
    src = make_tiny_model(tmp_path / "hf", family, seed=2, with_tokenizer=False,
                          **({"num_experts": 8} if ep > 1 else {}))
    assert hf_to_megatron(src, tmp_path / "mg", tp, pp, ep=ep, dtype=dtype)
    files = sorted((tmp_path / "mg").rglob("model_optim_rng.pt"))
    assert len(files) == tp * pp * ep
    for f in files:
        sd = torch.load(f, weights_only=False)
        assert f.read_bytes() == saved(sd), f


_PEAK = """
import json, sys
from ascendfactory.convert.hf2mg import hf_to_megatron
hf_to_megatron(sys.argv[1], sys.argv[2], 1, 1)
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(int(hwm.split()[1]) / 1024))
"""


def test_hf2mg_peak_memory_does_not_grow_with_experts(tmp_path):
    """8 vs 32 experts in one rank file (EP1): 1.5 MiB per expert and layer, so holding the file would add 72 MiB
    at 32 experts; streamed, the peak stays within a few MiB."""
    peaks, sizes = {}, {}
    for n in (8, 32):
        src = make_tiny_model(tmp_path / f"hf{n}", "qwen3_moe", seed=0, with_tokenizer=False, vocab_size=256,
                              hidden_size=256, moe_intermediate_size=512, num_experts=n, num_hidden_layers=2,
                              mlp_only_layers=[])
        r = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / f"mg{n}")], capture_output=True,
                           text=True, check=True)
        peaks[n] = json.loads(r.stdout.strip().splitlines()[-1])
        sizes[n] = sum(f.stat().st_size for f in (tmp_path / f"mg{n}").rglob("*.pt")) / 2**20
    assert sizes[32] - sizes[8] > 70, sizes  # what holding the whole rank file would add
    assert peaks[32] - peaks[8] < 20, (peaks, sizes)
