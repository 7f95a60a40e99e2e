"""Prompt templates: a Conversation -> (rendered text, supervised character spans).

Every assistant turn and the end-of-turn/EOS token that closes it are supervised; everything else
(system, user, tool output, role headers, separators) is not. The whole text is tokenized in one
go afterwards, so the token ids equal tokenizer.apply_chat_template(messages) for the same messages.

`auto` renders the tokenizer's own chat_template with the same renderer apply_chat_template uses and
finds each assistant span by rendering the conversation prefixes (the standard prefix method).
"""

from __future__ import annotations

import json

from ascendfactory.config.schema import PROMPT_TYPES
from ascendfactory.data.handlers import BadRecord, Conversation
from ascendfactory.data.names import FLAGS
from ascendfactory.data.tokenizer import TokenizerInfo
from ascendfactory.errors import UserError

QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _tool_schemas(tools: str) -> list:
    try:
        schemas = json.loads(tools)
    except json.JSONDecodeError as e:
        raise BadRecord(f"tools: not valid JSON ({e.msg})") from None
    return schemas if isinstance(schemas, list) else [schemas]


def _qwen_tools(tools: str) -> str:
    # Qwen2.5's tool-calling system prompt
    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in _tool_schemas(tools))
    return (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + lines +
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call>"
    )


def _system_with_tools(conv: Conversation) -> str | None:
    """The system prompt with the tool schemas appended as plain text (templates without a tools slot)."""
    if not conv.tools:
        return conv.system
    return (conv.system or "") + _plain_tools(conv.tools)


def _plain_tools(tools: str) -> str:
    return f"\n\n# Tools\n\n{tools}"


def _qwen(conv: Conversation, tok: TokenizerInfo):
    system = (conv.system if conv.system is not None else QWEN_DEFAULT_SYSTEM)
    if conv.tools:
        system += _qwen_tools(conv.tools)
    yield f"<|im_start|>system\n{system}<|im_end|>\n", False
    for role, c in conv.turns:
        if role == "user":
            yield f"<|im_start|>user\n{c}<|im_end|>\n", False
        elif role == "observation":
            yield f"<|im_start|>user\n<tool_response>\n{c}\n</tool_response><|im_end|>\n", False
        else:
            yield "<|im_start|>assistant\n", False
            yield (f"<tool_call>\n{c}\n</tool_call>" if role == "function_call" else c) + "<|im_end|>", True
            yield "\n", False


def _llama3(conv: Conversation, tok: TokenizerInfo):
    # Llama-3 Instruct trims every message, as its chat_template does
    def header(role):
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    system = _system_with_tools(conv)
    yield "<|begin_of_text|>", False
    if system is not None:
        yield header("system") + system.strip() + "<|eot_id|>", False
    for role, c in conv.turns:
        if role in ("user", "observation"):
            yield header("user" if role == "user" else "ipython") + c.strip() + "<|eot_id|>", False
        else:
            yield header("assistant"), False
            yield c.strip() + "<|eot_id|>", True


def _llama2(conv: Conversation, tok: TokenizerInfo):
    # Llama-2-chat: the system prompt sits inside the first [INST] block
    system = _system_with_tools(conv)
    for i, (role, c) in enumerate(conv.turns):
        if role in ("user", "observation"):
            if i == 0 and system:
                c = f"<<SYS>>\n{system}\n<</SYS>>\n\n{c}"
            yield f"{tok.bos_token}[INST] {c.strip()} [/INST]", False
        else:
            yield " ", False
            yield f"{c.strip()} {tok.eos_token}", True


def _mistral(conv: Conversation, tok: TokenizerInfo):
    system = _system_with_tools(conv)
    yield tok.bos_token, False
    for i, (role, c) in enumerate(conv.turns):
        if role in ("user", "observation"):
            if i == 0 and system:
                c = f"{system}\n\n{c}"
            yield f"[INST] {c} [/INST]", False
        else:
            yield c + tok.eos_token, True


def _glm(prefix: str, sep: str):
    """ChatGLM3 / GLM-4: a prefix, then `<|role|>` + sep + content per message, as their chat templates render
    (no end-of-turn token: the next role token ends a turn). The assistant content is what is supervised."""

    def render(conv: Conversation, tok: TokenizerInfo):
        yield prefix, False
        system = _system_with_tools(conv)
        if system:
            yield f"<|system|>{sep}{system}", False
        for role, c in conv.turns:
            if role in ("user", "observation"):
                yield f"<|{role}|>{sep}{c}", False
            else:
                yield f"<|assistant|>{sep}", False
                yield c, True

    return render


def _empty(conv: Conversation, tok: TokenizerInfo):
    if conv.system:
        yield conv.system, False
    if conv.tools:
        yield conv.tools, False
    for role, c in conv.turns:
        yield (c + tok.eos_token, True) if role in ("assistant", "function_call") else (c, False)


def _alpaca_legacy(conv: Conversation, tok: TokenizerInfo):
    # GeneralInstructionHandler: the original Alpaca prompt, one turn per earlier exchange
    yield tok.bos_token, False
    for role, c in conv.turns:
        if role == "user":
            yield ALPACA_PROMPT.format(instruction=c), False
        else:
            yield c + tok.eos_token, True
            yield "\n\n", False


_BUILTIN = {"qwen": _qwen, "llama3": _llama3, "llama2": _llama2, "mistral": _mistral, "empty": _empty,
            "alpaca": _alpaca_legacy,
            # ChatGLM3's SentencePiece dummy prefix shows as the space after "\n" in its template
            "chatglm3": _glm("[gMASK]sop", "\n "), "glm4": _glm("[gMASK]<sop>", "\n")}


def _join(pieces) -> tuple[str, list[tuple[int, int]]]:
    parts, spans, pos = [], [], 0
    for text, supervised in pieces:
        if supervised and text:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    return "".join(parts), spans


class Renderer:
    """Renders conversations with one prompt type; picklable (worker processes get a copy).
    GeneralInstructionHandler always uses the legacy Alpaca prompt, whatever the prompt type."""

    def __init__(self, handler: str, prompt_type: str, tok: TokenizerInfo, tokenizer_path: str,
                 names: dict = FLAGS):
        key = names["prompt_type"]
        if prompt_type not in PROMPT_TYPES:
            raise UserError(f"{key} {prompt_type}: unknown; use one of {', '.join(PROMPT_TYPES)}")
        if prompt_type == "auto" and not tok.chat_template and handler != "GeneralInstructionHandler":
            raise UserError(f"{tokenizer_path}: the tokenizer has no chat_template, so {key} auto cannot be "
                            f"used; {'pass' if key.startswith('--') else 'set'} one of {', '.join(PROMPT_TYPES[1:])}")
        self.prompt_type = "alpaca" if handler == "GeneralInstructionHandler" else prompt_type
        self.tok = tok

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        if self.prompt_type != "auto":
            return _join(_BUILTIN[self.prompt_type](conv, self.tok))
        return self._render_chat_template(conv)

    def _render_chat_template(self, conv: Conversation):
        messages = [{"role": "system", "content": conv.system}] if conv.system is not None else []
        roles = {"user": "user", "assistant": "assistant", "observation": "tool", "function_call": "assistant"}
        tools = _tool_schemas(conv.tools) if conv.tools else None
        spans = []
        full = self._jinja(messages + [{"role": roles[r], "content": c} for r, c in conv.turns], tools, False)
        for i in range(1, len(conv.turns), 2):
            upto = messages + [{"role": roles[r], "content": c} for r, c in conv.turns[: i + 1]]
            prompt = self._jinja(upto[:-1], tools, True)
            turn = self._jinja(upto, tools, False)
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise UserError("the tokenizer's chat_template renders earlier turns differently once later turns "
                                "follow, so assistant turns cannot be located; pass --prompt-type qwen|llama3|...")
            # the supervised part: the reply and its end-of-turn token, not the whitespace after it
            end = len(turn.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return full, spans

    def _jinja(self, messages, tools, add_generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=self.tok.chat_template,
                add_generation_prompt=add_generation_prompt, **self.tok.special_tokens_map)
        except Exception as e:  # jinja raise_exception(): the template refuses this conversation
            raise BadRecord(f"chat_template refused the conversation: {e}") from None
        return rendered[0]
