"""Tiny HF models and tokenizers built offline, for tests, the demo and benchmarks.

Nothing here downloads anything: tokenizers are byte-level BPE trained on a few KB of
embedded text, models are random-init from transformers config classes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ascendfactory.families import FAMILIES as REGISTRY

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# GLM-4's (glm-4-9b-chat) special tokens, in their order.
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>"]

# Qwen2 / Qwen2.5 Instruct template (without tool calling).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-3 Instruct template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# glm-4-9b-chat's template without its tool-calling system prompt.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ChatGLM3-6B's template (its tokenizer_config.json).
CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the model learns to answer questions about numbers colours animals cities and code "
    "a quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat "
    "please write a short poem about the sea and the sky in spring "
    "def add(a, b): return a + b  # python code with numbers 0 1 2 3 4 5 6 7 8 9 "
    "assistant user system hello world what is the capital of france paris is the answer "
    "translate this sentence into english summarise the following text in one line "
)


def corpus_text(repeats: int = 40) -> list[str]:
    """A few KB of deterministic English-like text (lines), enough to train a small BPE."""
    words = _WORDS.split()
    lines = []
    for i in range(repeats):
        rot = words[i % len(words):] + words[: i % len(words)]
        lines.append(" ".join(rot[: 12 + i % 17]).capitalize() + ".")
    return lines


def make_tokenizer(out_dir: str | Path, flavor: str = "qwen", vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer and save it with save_pretrained.

    flavor "qwen": Qwen2-style specials and chat template, eos <|im_end|>, pad <|endoftext|>, no bos.
    flavor "llama3": Llama-3 specials and chat template, bos <|begin_of_text|>, eos <|eot_id|>.
    flavor "glm4": GLM-4 specials first (<|endoftext|> = id 0: eos and pad) and chat template; encodings start with
    [gMASK]<sop>, as glm-4-9b-chat-hf's tokenizer.json does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = GLM4_SPECIALS if flavor == "glm4" else QWEN_SPECIALS + LLAMA3_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    if flavor == "qwen":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kwargs = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)
    elif flavor == "llama3":
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
        kwargs = dict(
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|end_of_text|>",
            chat_template=LLAMA3_CHAT_TEMPLATE,
        )
    elif flavor == "glm4":
        tok.post_processor = processors.TemplateProcessing(
            single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[gMASK]", "<sop>")])
        kwargs = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=GLM4_CHAT_TEMPLATE)
    else:
        raise ValueError(f"unknown tokenizer flavor {flavor!r}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kwargs)
    fast.save_pretrained(str(out))
    return out


def make_remote_glm_tokenizer(out_dir: str | Path, kind: str = "glm4", vocab_size: int = 400) -> Path:
    """The tokenizer files of an original GLM checkpoint, whose tokenizer is remote code: a tokenizer.model trained
    here plus tokenizer_config.json (tokenizer class, chat template; no tokenizer.json).

    kind "chatglm3": a SentencePiece BPE model with ChatGLM3's settings (byte fallback, dummy prefix, identity
    normalization); needs the sentencepiece package. kind "glm4": a tiktoken-style file (`<base64 bytes> <rank>`
    lines) of a byte-level BPE trained with `tokenizers`, GLM-4's special tokens after it."""
    import base64
    import io

    from ascendfactory.data.tokenizer import GLM4_SPECIALS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_max_length": 4096, "padding_side": "left", "clean_up_tokenization_spaces": False}
    if kind == "chatglm3":
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus_text()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
        (out / "tokenizer.model").write_bytes(buf.getvalue())
        cfg.update(tokenizer_class="ChatGLMTokenizer", chat_template=CHATGLM3_CHAT_TEMPLATE,
                   auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]})
    elif kind == "glm4":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus_text(), trainer=trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        ranks = [bytes([b]) for b in range(256)]  # one rank per byte, then one per merge in training order
        for a, b in json.loads(tok.to_str())["model"]["merges"]:
            ranks.append(bytes(to_byte[c] for c in a + b))
        (out / "tokenizer.model").write_text(
            "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)), encoding="utf-8")
        cfg.update(tokenizer_class="ChatGLM4Tokenizer", chat_template=GLM4_CHAT_TEMPLATE,
                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                   added_tokens_decoder={str(len(ranks) + k): {"content": t, "special": True}
                                         for k, t in enumerate(GLM4_SPECIALS)},
                   auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]})
    else:
        raise ValueError(f"unknown GLM tokenizer kind {kind!r}")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


# make_tiny_model's family name -> its family record (families.py), whose `tiny` says how to build it.
FAMILIES = {fam.tiny.name: fam for fam in REGISTRY}


def tiny_config(family: str = "qwen2", vocab_size: int = 512, **overrides):
    """A transformers config of the given family with tiny sizes (GQA: 4 heads, 2 kv groups, 4 layers)."""
    import transformers

    tiny = FAMILIES[family].tiny
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    kw.update(copy.deepcopy(tiny.config))  # a copy: transformers may rewrite rope_scaling in place
    kw.update(overrides)
    return getattr(transformers, tiny.config_class)(**kw)


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype: str = "float32",
    **overrides,
) -> Path:
    """Save a random-init tiny HF model (safetensors + config) and, by default, a matching tokenizer."""
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = overrides.pop("vocab_size", None)
    if with_tokenizer:
        make_tokenizer(out, flavor=FAMILIES[family].tiny.tokenizer)
        if vocab_size is None:
            vocab_size = len(transformers.AutoTokenizer.from_pretrained(str(out)))
    cfg = tiny_config(family, vocab_size=vocab_size or 512, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].architectures[0])(cfg)
    # Random-init norms are all ones; perturb them so conversion mistakes on norms show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(str(out))
    return out


def write_instruction_data(path: str | Path, n: int = 64, style: str = "alpaca") -> Path:
    """A small deterministic instruction dataset (alpaca or sharegpt json lines) of our own."""
    lines = corpus_text(n + 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 10, (i * 3) % 10
            q = f"what is {a} plus {b}"
            ans = f"{a} plus {b} is {a + b}. {lines[i]}"
            if style == "alpaca":
                rec = {"instruction": q, "input": "", "output": ans}
            else:
                rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]}
            f.write(json.dumps(rec) + "\n")
    return path


def write_pretrain_data(path: str | Path, n: int = 64) -> Path:
    """A small jsonl corpus with a `text` column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for line in corpus_text(n):
            f.write(json.dumps({"text": line}) + "\n")
    return path
