"""hf2mg then mg2hf is bit-exact for every family and layout; the shards follow SPEC.md section 6; the output loads in
transformers; training checkpoints (optimizer state, _extra_state) export the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _convert_models import FAMILIES
from safetensors.torch import load_file

from ascendfactory.ckpt.files import rank_file, write_tracker
from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf, read_checkpoint_layout


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


LAYOUTS = [(1, 1, None), (1, 2, None), (2, 1, None), (2, 2, None), (1, 2, "1,3"), (2, 3, "1,2,1")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp,nll", LAYOUTS)
def test_roundtrip_bit_identical(tiny_models, tmp_path, family, tp, pp, nll):
    src = tiny_models[family]
    assert hf_to_megatron(src, tmp_path / "mg", tp, pp, nll)
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    ck = read_checkpoint_layout(tmp_path / "mg")
    layers = [int(x) for x in nll.split(",")] if nll else [4 // pp] * pp
    assert (ck.tp, ck.pp, list(ck.layers), ck.iteration) == (tp, pp, layers, 1)
    assert ck.source_model == str(src.resolve()) and ck.padded_vocab_size == ck.vocab_size


def test_shards_follow_spec(tiny_models, tmp_path):
    """TP2 PP2 shards against SPEC.md section 6 written out independently of the engine."""
    src = tiny_models["qwen2"]  # tied embeddings, qkv bias
    hf = hf_tensors(src)
    hf_to_megatron(src, tmp_path / "mg", 2, 2)
    nh, ng, d, T = 4, 2, 16, 2

    def qkv(i, suffix):
        q, k, v = (hf[f"model.layers.{i}.self_attn.{x}_proj.{suffix}"] for x in "qkv")
        rest = q.shape[1:]
        return torch.cat([q.reshape(ng, nh // ng * d, *rest), k.reshape(ng, d, *rest),
                          v.reshape(ng, d, *rest)], dim=1).reshape(-1, *rest)

    for p in range(2):
        for r in range(T):
            ckpt = torch.load(rank_file(tmp_path / "mg", 1, r, p, 2), weights_only=False)
            assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 1
            assert ckpt["args"]["tensor_model_parallel_size"] == 2 and ckpt["args"]["pipeline_model_parallel_size"] == 2
            sd = ckpt["model"]
            for j in range(2):
                i = 2 * p + j
                L = f"decoder.layers.{j}"
                assert torch.equal(sd[f"{L}.self_attention.linear_qkv.weight"], qkv(i, "weight").chunk(T)[r])
                assert torch.equal(sd[f"{L}.self_attention.linear_qkv.bias"], qkv(i, "bias").chunk(T)[r])
                assert torch.equal(sd[f"{L}.self_attention.linear_proj.weight"],
                                   hf[f"model.layers.{i}.self_attn.o_proj.weight"].chunk(T, dim=1)[r])
                gate, up = (hf[f"model.layers.{i}.mlp.{x}_proj.weight"] for x in ("gate", "up"))
                assert torch.equal(sd[f"{L}.mlp.linear_fc1.weight"], torch.cat([gate.chunk(T)[r], up.chunk(T)[r]]))
                assert torch.equal(sd[f"{L}.mlp.linear_fc2.weight"],
                                   hf[f"model.layers.{i}.mlp.down_proj.weight"].chunk(T, dim=1)[r])
                assert torch.equal(sd[f"{L}.input_layernorm.weight"], hf[f"model.layers.{i}.input_layernorm.weight"])
                assert torch.equal(sd[f"{L}.pre_mlp_layernorm.weight"],
                                   hf[f"model.layers.{i}.post_attention_layernorm.weight"])
            emb = hf["model.embed_tokens.weight"].chunk(T)[r]
            if p == 0:
                assert torch.equal(sd["embedding.word_embeddings.weight"], emb)
                assert "output_layer.weight" not in sd and "decoder.final_layernorm.weight" not in sd
            else:  # tied + PP > 1: the last stage holds a copy of the embedding as output layer
                assert torch.equal(sd["output_layer.weight"], emb)
                assert torch.equal(sd["decoder.final_layernorm.weight"], hf["model.norm.weight"])
                assert "embedding.word_embeddings.weight" not in sd


def test_tied_pp1_has_no_output_layer(tiny_models, tmp_path):
    hf_to_megatron(tiny_models["qwen2"], tmp_path / "mg", 1, 1)
    sd = torch.load(rank_file(tmp_path / "mg", 1, 0, 0, 1), weights_only=False)["model"]
    assert "output_layer.weight" not in sd and "embedding.word_embeddings.weight" in sd


def test_vocab_padding_roundtrip(tiny_models, tmp_path):
    src = tiny_models["llama"]
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    hf_to_megatron(src, tmp_path / "mg", 2, 1, make_vocab_size_divisible_by=64)
    padded = -(-vocab // 128) * 128
    assert padded > vocab
    ck = read_checkpoint_layout(tmp_path / "mg")
    assert (ck.vocab_size, ck.padded_vocab_size) == (vocab, padded)
    shards = [torch.load(rank_file(tmp_path / "mg", 1, r, 0, 1), weights_only=False)["model"] for r in range(2)]
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = torch.cat([s[key] for s in shards])
        assert full.shape[0] == padded and not full[vocab:].any()
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_dtype_and_transformers_load(tiny_models, tmp_path):
    import transformers

    src = tiny_models["llama"]  # fp32 source
    hf_to_megatron(src, tmp_path / "mg", 2, 1, dtype="bf16")
    assert read_checkpoint_layout(tmp_path / "mg").dtype == torch.bfloat16
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src, shard_size="200KB")
    out = tmp_path / "hf"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    want = {k: v.to(torch.bfloat16) for k, v in hf_tensors(src).items()}
    assert_identical(want, hf_tensors(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16
    assert all(torch.equal(p, want[n]) for n, p in model.state_dict().items())
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("hello world").input_ids == transformers.AutoTokenizer.from_pretrained(str(src))("hello world").input_ids


def test_training_checkpoint_exports(tiny_models, tmp_path):
    """A trainer save: iteration 7, optimizer / scheduler / rng entries, _extra_state keys; tracker says 7."""
    src = tiny_models["qwen3"]
    hf_to_megatron(src, tmp_path / "conv", 2, 2)
    save = tmp_path / "saved"
    for p in range(2):
        for r in range(2):
            ckpt = torch.load(rank_file(tmp_path / "conv", 1, r, p, 2), weights_only=False)
            model = {}
            for k, v in ckpt["model"].items():
                model[k] = v
                if k.endswith("linear_qkv.weight"):
                    model[k.replace(".weight", "._extra_state")] = None
            out = rank_file(save, 7, r, p, 2)
            out.parent.mkdir(parents=True)
            torch.save({"args": ckpt["args"], "checkpoint_version": 3.0, "iteration": 7, "model": model,
                        "optimizer": {"state": {0: {"exp_avg": torch.randn(1000)}}},
                        "opt_param_scheduler": {"num_steps": 7}, "rng_state": [{"random_rng_state": (3, (1,), None)}]},
                       out)
    write_tracker(save, 7)
    megatron_to_hf(save, tmp_path / "hf", src)
    assert_identical(hf_tensors(src), hf_tensors(tmp_path / "hf"))


def test_rerun_is_a_no_op(tiny_models, tmp_path):
    src = tiny_models["mistral"]
    assert hf_to_megatron(src, tmp_path / "mg", 1, 2)
    f = rank_file(tmp_path / "mg", 1, 0, 1, 2)
    before = f.stat().st_mtime_ns
    assert not hf_to_megatron(src, tmp_path / "mg", 1, 2)
    assert f.stat().st_mtime_ns == before
    f.unlink()  # same conversion, but incomplete now: redone
    assert hf_to_megatron(src, tmp_path / "mg", 1, 2) and f.is_file()
    assert megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    assert not megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging folders left behind"
