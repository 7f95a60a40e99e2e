"""The GLM family (issue 13): GlmForCausalLM / Glm4ForCausalLM logits against transformers at TP1 and TP2 PP2, the
original chatglm layout (converted, trained and exported back in its own layout, bit-exact), the original
checkpoints' tokenizers rebuilt without remote code (token for token against SentencePiece / tiktoken), the
chatglm3 / glm4 templates, the TP-vs-kv-groups rule, and the whole `train` pipeline with LoRA / PEFT export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ascendfactory.ckpt.files import rank_file
from ascendfactory.convert.api import hf_to_megatron, megatron_to_hf
from ascendfactory.data.tokenizer import hf_tokenizer
from ascendfactory.errors import UserError
from ascendfactory.modelinfo import facts_from_config, read_model_facts
from ascendfactory.tiny import corpus_text, make_remote_glm_tokenizer, make_tiny_model, write_instruction_data

# The remote-code files of an original checkpoint: copied on export as data, never imported (importing fails).
REMOTE_CODE = {name: "raise RuntimeError('remote code must never run')\n"
               for name in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")}


def chatglm_from_glm(glm_dir: Path, out: Path) -> Path:
    """A chatglm-layout checkpoint with a GlmForCausalLM's weights, renamed as SPEC.md section 9 documents (written
    out here, independently of convert/chatglm.py), plus ChatGLM's config.json and derived rotary buffer."""
    out.mkdir(parents=True, exist_ok=True)
    hf = {}
    for f in sorted(glm_dir.glob("*.safetensors")):
        hf.update(load_file(f))
    cfg = json.loads((glm_dir / "config.json").read_text())
    sd = {"transformer.embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
          "transformer.encoder.final_layernorm.weight": hf["model.norm.weight"],
          "transformer.output_layer.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        h, c = f"model.layers.{i}", f"transformer.encoder.layers.{i}"
        for w in ("weight", "bias"):
            sd[f"{c}.self_attention.query_key_value.{w}"] = torch.cat([hf[f"{h}.self_attn.{p}_proj.{w}"] for p in "qkv"])
        sd[f"{c}.input_layernorm.weight"] = hf[f"{h}.input_layernorm.weight"]
        sd[f"{c}.self_attention.dense.weight"] = hf[f"{h}.self_attn.o_proj.weight"]
        sd[f"{c}.post_attention_layernorm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        sd[f"{c}.mlp.dense_h_to_4h.weight"] = hf[f"{h}.mlp.gate_up_proj.weight"]
        sd[f"{c}.mlp.dense_4h_to_h.weight"] = hf[f"{h}.mlp.down_proj.weight"]
    dtype = hf["lm_head.weight"].dtype
    dim = cfg["head_dim"] // 2  # ChatGLM's RotaryEmbedding(kv_channels // 2) buffer, in the model's dtype
    sd["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"], "kv_channels": cfg["head_dim"],
        "num_attention_heads": cfg["num_attention_heads"], "multi_query_attention": True,
        "multi_query_group_num": cfg["num_key_value_heads"], "padded_vocab_size": cfg["vocab_size"],
        "layernorm_epsilon": cfg["rms_norm_eps"], "seq_length": cfg["max_position_embeddings"],
        "rope_ratio": cfg["rope_parameters"]["rope_theta"] / 10000, "add_qkv_bias": True, "add_bias_linear": False,
        "rmsnorm": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
        "original_rope": True, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    for name, text in REMOTE_CODE.items():
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny glm / glm4 (HF-native, with a GLM-4 tokenizer.json) and the glm model in the chatglm layout (bf16, as
    the originals are) with glm-4-9b's tiktoken tokenizer.model and remote-code files."""
    root = tmp_path_factory.mktemp("glm")
    out = {f: make_tiny_model(root / f, f, seed=3) for f in ("glm", "glm4")}
    tok = make_remote_glm_tokenizer(root / "chatglm", "glm4")
    vocab = len(hf_tokenizer(tok))
    glm_bf16 = make_tiny_model(root / "glm_bf16", "glm", seed=4, with_tokenizer=False, vocab_size=vocab,
                               dtype="bfloat16")
    out["glm_bf16"] = glm_bf16
    out["chatglm"] = chatglm_from_glm(glm_bf16, root / "chatglm")
    return out


def _shards(mg: Path, tp: int, pp: int) -> dict:
    return {(t, p): torch.load(rank_file(mg, 1, t, p, pp), weights_only=False)["model"]
            for t in range(tp) for p in range(pp)}


def _tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_chatglm_layout_converts_like_glm_and_exports_back_in_its_own_layout(models, tmp_path, tp, pp):
    src = models["chatglm"]
    assert read_model_facts(src) == read_model_facts(models["glm_bf16"])  # config.json read as GLM's
    hf_to_megatron(src, tmp_path / "mg", tp, pp)
    hf_to_megatron(models["glm_bf16"], tmp_path / "mg_glm", tp, pp)
    a, b = _shards(tmp_path / "mg", tp, pp), _shards(tmp_path / "mg_glm", tp, pp)
    for rank in a:
        assert sorted(a[rank]) == sorted(b[rank])
        assert all(torch.equal(a[rank][k], b[rank][k]) for k in a[rank]), rank
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf", src)
    want, got = _tensors(src), _tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    for name in ["config.json", "tokenizer.model", "tokenizer_config.json", *REMOTE_CODE]:
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes(), name
    # the same checkpoint exports HF-native with a GlmForCausalLM config
    megatron_to_hf(tmp_path / "mg", tmp_path / "hf_glm", models["glm_bf16"])
    want = _tensors(models["glm_bf16"])
    assert all(torch.equal(_tensors(tmp_path / "hf_glm")[k], want[k]) for k in want)


def test_chatglm_config_translation_and_refusals(models):
    cfg = json.loads((models["chatglm"] / "config.json").read_text())
    facts = facts_from_config(cfg)
    assert (facts.architecture, facts.num_kv_heads, facts.head_dim, facts.qkv_bias) == ("GlmForCausalLM", 2, 16, True)
    # RoPE base = 10000 x rope_ratio; absent: 1; one query group per head without multi_query_attention
    assert facts_from_config({**cfg, "rope_ratio": 500}).rope_theta == 5e6
    no_ratio = {k: v for k, v in cfg.items() if k != "rope_ratio"}
    assert facts_from_config(no_ratio).rope_theta == 10000.0
    assert facts_from_config({**cfg, "multi_query_attention": False}).num_kv_heads == 4
    with pytest.raises(UserError, match=r"^config.json: rmsnorm=False is not supported"):
        facts_from_config({**cfg, "rmsnorm": False})
    with pytest.raises(UserError, match=r"^config.json: missing key 'ffn_hidden_size'"):
        facts_from_config({k: v for k, v in cfg.items() if k != "ffn_hidden_size"})


def test_rules_refuse_tp_that_does_not_divide_kv_groups(tmp_path):
    from ascendfactory.config.loader import resolve
    from ascendfactory.config.rules import check
    from ascendfactory.launch.cluster import cluster_layout

    model = tmp_path / "chatglm3-6b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({  # ChatGLM3-6B's shape: 2 kv groups
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "num_layers": 28, "hidden_size": 4096,
        "ffn_hidden_size": 13696, "kv_channels": 128, "num_attention_heads": 32, "multi_query_attention": True,
        "multi_query_group_num": 2, "padded_vocab_size": 65024, "seq_length": 8192}))

    def problems(tp):
        p = tmp_path / "cfg.yaml"
        p.write_text(json.dumps({"m": {"model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
                                       "dataset": "/d.json", "tensor-model-parallel-size": tp,
                                       "micro-batch-size": 1, "global-batch-size": 64, "nproc_per_node": 8,
                                       "e": {}}}))
        r = resolve(p, "m", "e")
        return check(r, cluster_layout(r.cfg, env={})).problems

    assert problems(2) == []
    assert problems(4) == [f"multi_query_group_num (2, from {model}/config.json) must be divisible by "
                           "tensor_model_parallel_size (4)"]


SAMPLES = ["Hello  world\n\n  indented\tTab 12345 ünïcödé 中文 😺", " leading space", "sopwith and eopia are words (sop alone is a special token)",
           "def add(a, b):\n    return a + b\n", *corpus_text(20)]


@pytest.mark.parametrize("kind", ["chatglm3", "glm4"])
def test_original_tokenizers_rebuilt_token_for_token(tmp_path, kind):
    """The fast tokenizer built from tokenizer.model equals the original remote-code tokenizer: SentencePiece's
    encode (ChatGLM3) / tiktoken's (glm-4-9b) on plain text, special tokens at the ids after the model's entries,
    encodings prefixed as the originals' build_inputs_with_special_tokens does."""
    from ascendfactory.data.tokenizer import GLM4_PATTERN

    d = make_remote_glm_tokenizer(tmp_path, kind)
    tok = hf_tokenizer(d)
    if kind == "chatglm3":
        sp = pytest.importorskip("sentencepiece").SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        original, n = sp.encode, sp.get_piece_size()
        specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"]
        prefix = ["[gMASK]", "sop"]
    else:
        import base64

        tiktoken = pytest.importorskip("tiktoken")
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in
                                                          (d / "tokenizer.model").read_text().splitlines())}
        enc = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
        original, n = enc.encode, len(ranks)
        specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|observation|>"]
        prefix = ["[gMASK]", "<sop>"]
    assert tok.convert_tokens_to_ids(specials) == list(range(n, n + len(specials)))
    for text in SAMPLES:
        text = text.split(" (sop alone")[0] if kind == "chatglm3" else text
        ids = original(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok(text).input_ids == tok.convert_tokens_to_ids(prefix) + ids
        assert tok.decode(ids) == text
    # special tokens inside text are single ids; the text between them is encoded on its own, as the original does
    user, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert tok.encode("<|user|>\nhi there<|assistant|>", add_special_tokens=False) == [
        user, *original("\nhi there"), assistant]


def test_missing_tokenizer_file_is_one_line_naming_it(models, tmp_path):
    from ascendfactory.data.tokenizer import load_tokenizer

    d = tmp_path / "no_tok"
    d.mkdir()
    (d / "config.json").write_bytes((models["chatglm"] / "config.json").read_bytes())
    with pytest.raises(UserError) as e:
        load_tokenizer(str(d))
    assert str(e.value).startswith(f"{d / 'tokenizer.model'}: not found;") and "\n" not in str(e.value)
    data = write_instruction_data(tmp_path / "data.jsonl", n=4)
    r = subprocess.run([sys.executable, "-m", "ascendfactory", "preprocess", "--input", str(data),
                        "--tokenizer-name-or-path", str(d), "--output-prefix", str(tmp_path / "out" / "x")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {e.value}", r.stderr
    assert not (tmp_path / "out").exists()


CONVERSATIONS = [
    (None, [("what is 2 plus 3", "2 plus 3 is 5.")]),
    ("You answer briefly.", [("hello world", "hello"), ("what is the capital of france", "paris is the answer")]),
    ("Système ✓", [("translate this sentence", "le chat dort 😺"), ("and this one", "def add(a, b): return a + b")]),
]


def _encode(tok_dir, prompt_type, convs):
    from ascendfactory.data.encode import IGNORE_INDEX, encode_chunk
    from ascendfactory.data.handlers import parse_map_keys
    from ascendfactory.data.preprocess import make_job
    from ascendfactory.data.tokenizer import load_tokenizer

    handler = "SharegptStyleInstructionHandler"
    job = make_job(handler, str(tok_dir), load_tokenizer(str(tok_dir)), prompt_type, 100000, ["text"], False,
                   parse_map_keys(handler, None))
    records = []
    for system, pairs in convs:
        turns = [{"from": "system", "value": system}] if system is not None else []
        for q, a in pairs:
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"conversations": turns})
    res = encode_chunk(job, [(f"rec:{i}", r) for i, r in enumerate(records)])
    assert not res.bad
    bounds = np.concatenate([[0], np.cumsum(res.lengths)])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        ids, labels = res.ids[a:b], res.labels[a:b]
        sup = labels != IGNORE_INDEX
        assert (labels[sup] == ids[sup]).all()
        edges = np.flatnonzero(np.diff(np.concatenate([[0], sup.astype(int), [0]])))
        out.append((ids.tolist(), [ids[s:e].tolist() for s, e in zip(edges[::2], edges[1::2])]))
    return out


@pytest.mark.parametrize("source,prompt_type", [("hf", "glm4"), ("glm4", "glm4"), ("chatglm3", "chatglm3")])
def test_templates_equal_apply_chat_template_and_supervise_the_replies(models, tmp_path, source, prompt_type):
    """chatglm3 / glm4 render what the checkpoints' chat templates render (auto uses the template itself): the
    same ids as apply_chat_template, labels on exactly the assistant replies."""
    if source == "chatglm3":
        pytest.importorskip("sentencepiece")
    d = models["glm4"] if source == "hf" else make_remote_glm_tokenizer(tmp_path, source)
    tok = hf_tokenizer(d)
    start = "[gMASK]sop<|" if prompt_type == "chatglm3" else "[gMASK]<sop><|"
    for pt in (prompt_type, "auto"):
        samples = _encode(d, pt, CONVERSATIONS)
        for (ids, runs), (system, pairs) in zip(samples, CONVERSATIONS):
            msgs = [{"role": "system", "content": system}] if system is not None else []
            for q, a in pairs:
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            assert ids == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"]), pt
            assert tok.decode(ids).startswith(start)
            replies = [tok.decode(r).strip() for r in runs]
            assert replies == [a for _, a in pairs], pt


ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, model: Path, prompt_type: str, **exp) -> Path:
    out = tmp_path / "out"
    data = write_instruction_data(tmp_path / "data.jsonl", n=64)
    base = {"device": "cpu", "nproc_per_node": 2, "SEQ_LEN": 64, "MAX_PE": 256, "micro-batch-size": 2,
            "global-batch-size": 8, "lr": 2e-3, "min-lr": 2e-4, "train-iters": 8, "save-interval": 8,
            "log_interval": 1, "prompt_type": prompt_type, "tensor-model-parallel-size": 1, "pack": True}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"base": base, "tiny": {"model_name_or_path": str(model), "dataset": str(data),
                                                          "output_dir": str(out), "exp": exp}}))
    r = subprocess.run([sys.executable, "-m", "ascendfactory", "train", str(cfg), "tiny", "exp"], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == exp.get("train-iters", 8) and losses[-1] < losses[0], losses
    return out


@pytest.mark.slow
def test_logits_glm_glm4_tp1_and_tp2pp2(models, tmp_path):
    """Megatron logits from the converted checkpoints equal transformers' GlmForCausalLM / Glm4ForCausalLM; the
    chatglm layout's conversion gives GlmForCausalLM's logits for the same weights. The comparison can fail: a
    GLM-4 post-MLP norm nudged shows."""
    from ascendfactory.convert.verify import TOLERANCE, compare

    jobs = []
    for family in ("glm", "glm4"):
        for tp, pp in ((1, 1), (2, 2)):
            hf_to_megatron(models[family], tmp_path / f"{family}{tp}{pp}", tp, pp)
            jobs.append({"hf_dir": str(models[family]), "mg_dir": str(tmp_path / f"{family}{tp}{pp}")})
    hf_to_megatron(models["chatglm"], tmp_path / "chatglm", 2, 2)
    jobs.append({"hf_dir": str(models["chatglm"]), "mg_dir": str(tmp_path / "chatglm")})
    bad = tmp_path / "glm4-bad"
    shutil.copytree(tmp_path / "glm422", bad)
    f = rank_file(bad, 1, 1, 1, 2)
    ckpt = torch.load(f, weights_only=False)
    ckpt["model"]["decoder.layers.1.post_mlp_layernorm.weight"] *= 1.5
    torch.save(ckpt, f)
    jobs.append({"hf_dir": str(models["glm4"]), "mg_dir": str(bad)})
    results = compare(jobs, nproc=4)
    diffs = [r["max_abs_diff"] for r in results]
    assert all(d <= TOLERANCE for d in diffs[:-1]), diffs
    assert diffs[-1] > 1e-3, diffs


@pytest.mark.slow
def test_glm4_train_pipeline_loss_falls_and_export_matches(models, tmp_path):
    from ascendfactory.convert.verify import verify_conversion

    out = _train(tmp_path, models["glm4"], "glm4")
    export = out / "converted_mg2hf_weight"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Glm4ForCausalLM"]
    assert verify_conversion(export, out / "saved_checkpoints") < 1e-4


@pytest.mark.slow
def test_chatglm_layout_trains_and_exports_in_its_own_layout(models, tmp_path):
    """An original glm-4-9b-layout checkpoint (tiktoken tokenizer.model, remote-code files) goes through the whole
    pipeline without any hand edit; the export is chatglm-layout weights + the original files, unchanged."""
    src = models["chatglm"]
    out = _train(tmp_path, src, "auto")  # auto: the chat template of tokenizer_config.json
    export = out / "converted_mg2hf_weight"
    got, want = _tensors(export), _tensors(src)
    assert sorted(got) == sorted(want) and all(got[k].shape == want[k].shape for k in want)
    assert torch.equal(got["transformer.rotary_pos_emb.inv_freq"], want["transformer.rotary_pos_emb.inv_freq"])
    assert not torch.equal(got["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"],
                           want["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"])  # trained
    for name in ["config.json", "tokenizer.model", "tokenizer_config.json", *REMOTE_CODE]:
        assert (export / name).read_bytes() == (src / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_lora_run_exports_a_peft_adapter_that_reproduces_the_merged_model(models, tmp_path, family):
    PeftModel = pytest.importorskip("peft").PeftModel
    from transformers import AutoModelForCausalLM

    out = _train(tmp_path, models[family], "glm4", finetuning_type="lora", lora_r=4, lora_alpha=8, lr=1e-2)
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    tokens = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(base, out / "lora_adapter")(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "converted_mg2hf_weight",
                                                      dtype=torch.float32)(tokens).logits
    assert (with_adapter - merged).abs().max() < 1e-5


@pytest.mark.slow
def test_chatglm_layout_lora_peft_adapter_targets_its_own_linears(models, tmp_path):
    """A LoRA run on a chatglm-layout model: the PEFT adapter names the original model's linears (q / k / v share
    query_key_value's A, their B rows stacked), and B A x scale is what the merged export added to each weight."""
    src = models["chatglm"]
    out = _train(tmp_path, src, "glm4", finetuning_type="lora", lora_r=4, lora_alpha=8, lr=1e-2)
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    adapter = load_file(out / "lora_adapter" / "adapter_model.safetensors")
    base, merged = _tensors(src), _tensors(out / "converted_mg2hf_weight")
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    assert len(modules) == 4 * 4 and all(f"{m}.weight" in base for m in modules)
    for m in modules:
        a, b = (adapter[f"base_model.model.{m}.lora_{x}.weight"] for x in "AB")
        delta = (merged[f"{m}.weight"].float() - base[f"{m}.weight"].float())
        want = 2.0 * b @ a
        assert want.abs().max() > 1e-3 and (delta - want).abs().max() < 0.02 * want.abs().max() + 4e-3, m
