"""Handlers: one raw record -> what gets tokenized (pretrain texts, or a normalized conversation).

Column and role names follow LLaMA-Factory's dataset_info keys and can be remapped with --map-keys, e.g.
`{"prompt": "question", "response": "answer"}` or `{"messages": "dialog", "role_tag": "speaker"}`.
A record that cannot be used raises BadRecord (the caller adds file:line and stops or skips).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ascendfactory.config.schema import HANDLERS, PRETRAIN
from ascendfactory.data.names import FLAGS
from ascendfactory.errors import UserError

# roles of a normalized conversation; the first two kinds prompt, the last two are supervised
PROMPT_ROLES = ("user", "observation")
RESPONSE_ROLES = ("assistant", "function_call")

_DEFAULT_KEYS = {
    "AlpacaStyleInstructionHandler": dict(prompt="instruction", query="input", response="output",
                                          system="system", history="history"),
    "GeneralInstructionHandler": dict(prompt="instruction", query="input", response="output"),
    "SharegptStyleInstructionHandler": dict(
        messages="conversations", system="system", tools="tools", role_tag="from", content_tag="value",
        user_tag="human", assistant_tag="gpt", observation_tag="observation", function_tag="function_call",
        system_tag="system"),
    "OpenAIStyleInstructionHandler": dict(
        messages="messages", system="system", tools="tools", role_tag="role", content_tag="content",
        user_tag="user", assistant_tag="assistant", observation_tag="tool", function_tag="function_call",
        system_tag="system"),
    # MOSS-003 SFT: {"meta_instruction": ..., "chat": {"turn_1": {"Human": "<|Human|>: q<eoh>\n", "MOSS": ...}}}
    "MOSSInstructionHandler": dict(system="meta_instruction", chat="chat", user_tag="Human", assistant_tag="MOSS"),
}


class BadRecord(Exception):
    """A record that cannot be used; the message says what is wrong with it."""


@dataclass
class Conversation:
    system: str | None
    tools: str | None  # JSON text of the tool schemas, as datasets carry it
    turns: list[tuple[str, str]]  # (role in PROMPT_ROLES + RESPONSE_ROLES, content), alternating prompt/response


def parse_map_keys(handler: str, map_keys, names: dict = FLAGS) -> dict:
    """The handler's column/role names with the user's --map-keys applied (names: data.names)."""
    key = names["map_keys"]
    if handler not in HANDLERS:
        raise UserError(f"{names['handler_name']} {handler}: unknown; use one of {', '.join(HANDLERS)}")
    if isinstance(map_keys, str):
        try:
            map_keys = json.loads(map_keys)
        except json.JSONDecodeError as e:
            raise UserError(f"{key}: not valid JSON ({e.msg}); e.g. '{{\"prompt\": \"question\"}}'") from None
    map_keys = map_keys or {}
    if not isinstance(map_keys, dict) or not all(isinstance(v, str) for v in map_keys.values()):
        raise UserError(f"{key}: must be a JSON object of strings, e.g. '{{\"prompt\": \"question\"}}'")
    if handler == PRETRAIN:
        if map_keys:
            raise UserError(f"{key} is for instruction handlers; for GeneralPretrainHandler name the text "
                            f"columns with {names['json_keys']}")
        return {}
    keys = dict(_DEFAULT_KEYS[handler])
    unknown = sorted(set(map_keys) - set(keys))
    if unknown:
        raise UserError(f"{key}: unknown key(s) {', '.join(unknown)} for {handler}; known: {', '.join(keys)}")
    keys.update(map_keys)
    return keys


def pretrain_texts(record: dict, json_keys: list[str]) -> list[str]:
    texts = []
    for key in json_keys:
        if key not in record:
            raise BadRecord(f"missing key '{key}' (keys: {', '.join(map(str, record)) or 'none'})")
        text = record[key]
        if not isinstance(text, str):
            raise BadRecord(f"'{key}' is {type(text).__name__}, not text")
        if not text.strip():
            raise BadRecord(f"empty text in '{key}'")
        texts.append(text)
    return texts


def to_conversation(handler: str, record: dict, keys: dict) -> Conversation:
    if handler in ("AlpacaStyleInstructionHandler", "GeneralInstructionHandler"):
        return _alpaca(record, keys)
    if handler == "MOSSInstructionHandler":
        return _moss(record, keys)
    return _chat(record, keys)


def _text(record: dict, column: str, required: bool) -> str:
    if column not in record or record[column] is None:
        if required:
            raise BadRecord(f"missing column '{column}' (columns: {', '.join(map(str, record)) or 'none'})")
        return ""
    value = record[column]
    if not isinstance(value, str):
        raise BadRecord(f"'{column}' is {type(value).__name__}, not text")
    return value


def _system(record: dict, keys: dict) -> str | None:
    system = _text(record, keys["system"], False) if "system" in keys else ""
    return system if system.strip() else None


def _alpaca(record: dict, keys: dict) -> Conversation:
    instruction = _text(record, keys["prompt"], True)
    query = _text(record, keys["query"], False)
    response = _text(record, keys["response"], True)
    user = f"{instruction}\n{query}" if query else instruction
    if not user.strip():
        raise BadRecord(f"empty '{keys['prompt']}' and '{keys['query']}'")
    if not response.strip():
        raise BadRecord(f"empty '{keys['response']}'")
    turns = []
    history = record.get(keys["history"]) if "history" in keys else None
    if history:
        if not isinstance(history, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in history
        ):
            raise BadRecord(f"'{keys['history']}' must be a list of [query, answer] text pairs")
        for q, a in history:
            turns += [("user", q), ("assistant", a)]
    turns += [("user", user), ("assistant", response)]
    return Conversation(_system(record, keys), None, turns)


def _chat(record: dict, keys: dict) -> Conversation:
    column = keys["messages"]
    messages = record.get(column)
    if messages is None:
        raise BadRecord(f"missing column '{column}' (columns: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"'{column}' must be a non-empty list of messages")
    roles = {keys["user_tag"]: "user", keys["assistant_tag"]: "assistant", keys["observation_tag"]: "observation",
             keys["function_tag"]: "function_call", keys["system_tag"]: "system"}
    role_key, content_key = keys["role_tag"], keys["content_tag"]
    system = _system(record, keys)
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise BadRecord(f"'{column}'[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = roles.get(m[role_key])
        if role is None:
            raise BadRecord(f"'{column}'[{i}]: unknown role '{m[role_key]}' (expected one of {', '.join(roles)})")
        content = m[content_key]
        if not isinstance(content, str):
            raise BadRecord(f"'{column}'[{i}]: content is {type(content).__name__}, not text")
        if role == "system":
            if i != 0:
                raise BadRecord(f"'{column}'[{i}]: a system message is only allowed first")
            system = content if content.strip() else system
            continue
        expected = PROMPT_ROLES if len(turns) % 2 == 0 else RESPONSE_ROLES
        if role not in expected:
            raise BadRecord(f"'{column}'[{i}]: roles out of order: got '{m[role_key]}', expected "
                            f"{' or '.join(k for k, v in roles.items() if v in expected)}")
        if role in RESPONSE_ROLES and not content.strip():
            raise BadRecord(f"'{column}'[{i}]: empty response")
        turns.append((role, content))
    if not turns or len(turns) % 2:
        raise BadRecord(f"'{column}' must end with a {keys['assistant_tag']} message")
    tools = record.get(keys["tools"]) if "tools" in keys else None
    if tools is not None and not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    return Conversation(system, tools or None, turns)


_MOSS_MARKS = {"Human": ("<|Human|>:", "<eoh>"), "MOSS": ("<|MOSS|>:", "<eom>")}


def _moss_text(turn: dict, tag: str, where: str) -> str:
    value = turn.get(tag)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"{where}: missing or empty '{tag}'")
    head, tail = _MOSS_MARKS.get(tag, ("", ""))
    value = value.strip()
    value = value[len(head):] if head and value.startswith(head) else value
    value = value[: -len(tail)] if tail and value.endswith(tail) else value
    return value.strip()


def _moss(record: dict, keys: dict) -> Conversation:
    chat = record.get(keys["chat"])
    if not isinstance(chat, dict) or not chat:
        raise BadRecord(f"missing or empty '{keys['chat']}' (an object of turn_1, turn_2, ...)")
    order = sorted(chat, key=lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else 1 << 30)
    turns = []
    for name in order:
        turn = chat[name]
        if not isinstance(turn, dict):
            raise BadRecord(f"'{keys['chat']}.{name}' must be an object")
        where = f"'{keys['chat']}.{name}'"
        turns += [("user", _moss_text(turn, keys["user_tag"], where)),
                  ("assistant", _moss_text(turn, keys["assistant_tag"], where))]
    return Conversation(_system(record, keys), None, turns)
