"""Reading torch_dist checkpoints (megatron-core dist_checkpointing, SPEC.md section 11) without megatron-core:
every reader of checkpoints (mg2hf, --verify, plan's checks) takes them as it takes legacy ones, by content."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from _dist_ckpts import assert_same_tensors, hf_tensors

from ascendfactory.ckpt import dist
from ascendfactory.ckpt.files import DCP_INDEX, iter_dir_name, problem_of
from ascendfactory.ckpt.reader import read_checkpoint_layout
from ascendfactory.cli import main
from ascendfactory.convert.api import megatron_to_hf, verify_conversion
from ascendfactory.errors import UserError

slow = pytest.mark.slow


@slow
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_mg2hf_of_torch_dist_equals_mg2hf_of_legacy(dist_ckpts, kind, tmp_path):
    """megatron-core's own save of a TP2 PP2 (dense) / TP2 EP2 (MoE) model reads as one TP1 PP1 EP1 rank of global
    tensors, and exports to the same HF bytes as the legacy checkpoint it was saved from."""
    ck = read_checkpoint_layout(dist_ckpts[f"{kind}_dist"])
    assert (ck.format, ck.tp, ck.pp, ck.ep, ck.layers) == ("torch_dist", 1, 1, 1, (4,))
    assert ck.saved == ((2, 2, 1) if kind == "dense" else (2, 1, 2))
    assert ck.padded_vocab_size == read_checkpoint_layout(dist_ckpts[f"{kind}_legacy"]).padded_vocab_size
    for src in ("legacy", "dist"):
        assert megatron_to_hf(dist_ckpts[f"{kind}_{src}"], tmp_path / src, dist_ckpts[f"{kind}_hf"])
    assert_same_tensors(hf_tensors(tmp_path / "legacy"), hf_tensors(tmp_path / "dist"))


@slow
def test_dist_state_reads_one_layer_at_a_time(dist_ckpts):
    """A stacked key's layer (and an expert of a per-layer key) is read alone: its own shape, from the chunks that
    hold it."""
    state = read_checkpoint_layout(dist_ckpts["dense_dist"]).state(0, 0)
    assert state.stacked
    qkv = state["decoder.layers.3.self_attention.linear_qkv.weight"]
    assert qkv.shape == state.index.size("decoder.layers.self_attention.linear_qkv.weight")[1:]
    moe = read_checkpoint_layout(dist_ckpts["moe_dist"]).state(0, 0)
    assert not moe.stacked and "decoder.layers.1.mlp.linear_fc1.weight" in moe  # the dense layer
    fc1 = moe["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert fc1.shape == moe.index.size("decoder.layers.2.mlp.experts.experts.linear_fc1.weight")[1:]


@slow
def test_verify_reads_torch_dist(dist_ckpts):
    """--verify builds the model at the checkpoint's layout (one rank of global tensors) and matches HF's logits."""
    assert verify_conversion(dist_ckpts["dense_hf"], dist_ckpts["dense_dist"]) < 1e-4


@slow
def test_manifest_check_and_crafted_index(dist_ckpts, tmp_path, capsys):
    """A torch_dist folder without a manifest is complete with its index; torch's .metadata is a plain pickle:
    a crafted one is refused naming it, exit 2, before anything is unpickled in full."""
    src = tmp_path / "ck"
    shutil.copytree(dist_ckpts["dense_dist"], src)
    it = src / iter_dir_name(1)
    assert problem_of(it, require_manifest=False) is None
    assert problem_of(it, require_manifest=True) == f"{it / 'manifest.json'} missing (incomplete checkpoint)"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (it / DCP_INDEX).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match=r"\.metadata: refused to load type builtins\.print"):
        read_checkpoint_layout(src)
    with pytest.raises(SystemExit) as e:
        main(["convert", "mg2hf", "--mg-dir", str(src), "--hf-dir", str(tmp_path / "hf"), "--hf-config-dir",
              str(dist_ckpts["dense_hf"])])
    out = capsys.readouterr()
    assert e.value.code == 2 and "pwned" not in out.out
    assert [ln for ln in out.err.splitlines() if ln.startswith("error:")] == [
        f"error: {it / DCP_INDEX}: refused to load type builtins.print: unpickling it could run code from the file; "
        "only if you trust whoever wrote it, set trust_checkpoint: true (convert: --trust-checkpoint)"]
    (it / DCP_INDEX).unlink()
    assert problem_of(it, require_manifest=False) == f"{it / DCP_INDEX} missing"
    assert not (tmp_path / "hf").exists()


@slow
def test_damaged_shard_file_is_an_error(dist_ckpts, tmp_path):
    """A .distcp file cut short: the tensor read from it is an error naming the checkpoint, nothing exported."""
    src = tmp_path / "ck"
    shutil.copytree(dist_ckpts["dense_dist"], src)
    shard = sorted((src / iter_dir_name(1)).glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=r"iter_0000001: tensor .* unreadable .*; the checkpoint is damaged"):
        megatron_to_hf(src, tmp_path / "hf", dist_ckpts["dense_hf"])
    assert not (tmp_path / "hf").exists()


def test_sharded_keys_round_trip():
    """Our names <-> megatron-core's keys: the TE norm names of the local spec, stacked layers, experts."""
    cases = {
        ("decoder.layers.5.input_layernorm.weight", True):
            ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (5,)),
        ("decoder.layers.5.pre_mlp_layernorm.weight", False): ("decoder.layers.5.mlp.linear_fc1.layer_norm_weight", ()),
        ("decoder.layers.2.mlp.experts.local_experts.7.linear_fc2.weight", False):
            ("decoder.layers.2.mlp.experts.experts.linear_fc2.weight", (7,)),
        ("decoder.layers.2.mlp.experts.local_experts.7.linear_fc2.weight", True):
            ("decoder.layers.mlp.experts.experts.linear_fc2.weight", (2, 7)),
        ("embedding.word_embeddings.weight", True): ("embedding.word_embeddings.weight", ()),
    }
    for (name, stacked), want in cases.items():
        assert dist.sharded_key(name, stacked) == want
        assert dist.state_name(*want, stacked) == name


def test_common_state_loads_safely(tmp_path):
    """common.pt goes through the safe loader: a pickled callable is refused naming the file."""
    it = tmp_path / "iter_0000001"
    it.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"args": Evil()}, it / dist.COMMON_FILE)
    with pytest.raises(UserError, match=r"common\.pt: refused to load type (builtins\.)?print"):
        dist.read_common(it)
