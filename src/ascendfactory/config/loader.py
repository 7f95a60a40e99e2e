"""Experiment YAML -> one resolved ExpConfig.

File shape (SPEC.md section 2): an optional `base` block, then one block per model name; inside a model
block, every mapping value is an experiment block and everything else is a model-level key.
Merge order: base -> model -> experiment -> command line (`--key=value`, dotted for nested mappings),
then `${key}` / `${a.b}` interpolation, then unknown-key and type checks, all problems reported together.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ascendfactory.config.keys import GROUPS, MAPPING_KEYS, is_known, normalize, suggestion
from ascendfactory.config.schema import ExpConfig, allowed_range
from ascendfactory.errors import UserError, UserErrors

BASE_BLOCK = "base"
_REF = re.compile(r"\$\{([^}]+)\}")


@dataclass
class Resolved:
    cfg: ExpConfig
    source: str
    model_name: str
    exp_name: str
    origins: dict[str, str] = field(default_factory=dict)  # canonical key -> where its value came from

    def where(self, key: str) -> str:
        return self.origins.get(key, "default")


# Aliases share one node while parsing, but merging, interpolation and `plan --json` walk the expanded
# values: an alias bomb (billion laughs) would grow without bound. A real experiment file has a few hundred.
MAX_YAML_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
# The same for interpolation: `a1: ${a0}${a0}`, `a2: ${a1}${a1}`, ... doubles a string per line.
MAX_VALUE_CHARS = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that checks the composed document before building it (see _check_nodes)."""

    source = "<string>"

    def construct_document(self, node):
        _check_nodes(node, self.source)
        return super().construct_document(node)


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Refuse an expansion beyond MAX_YAML_VALUES, a recursive alias, and a key written twice in one
    block, also by spelling (SEQ_LEN and seq_len), outside the free-form mappings (extra_args, map_keys)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    duplicates: list[str] = []

    def walk(node: yaml.Node, free_form: bool) -> int:
        if id(node) in sizes:  # an alias: counted at its full size, composed once
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise UserError(f"{source}:{node.start_mark.line + 1}: a YAML alias refers to the value that contains "
                            "it; write the value out")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(walk(item, free_form) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    name = key.value if free_form else normalize(key.value)
                    if name in seen:
                        first = seen[name]
                        what = "block" if isinstance(value, yaml.MappingNode) else "key"
                        also = f" as `{first.value}`" if first.value != key.value else ""
                        duplicates.append(f"{source}:{key.start_mark.line + 1}: duplicate {what} `{key.value}` "
                                          f"(already written{also} at {source}:{first.start_mark.line + 1}); "
                                          "keep one of them")
                    seen.setdefault(name, key)
                inner = free_form or (isinstance(key, yaml.ScalarNode) and normalize(key.value) in MAPPING_KEYS)
                total += walk(key, free_form) + walk(value, inner)
        if total > MAX_YAML_VALUES:
            raise UserError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values through aliases "
                            "(&anchor / *alias); write the values out or use fewer aliases")
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    walk(root, free_form=False)
    if duplicates:
        raise UserErrors(duplicates)


def safe_load(text: str, source: str):
    """yaml.safe_load with the checks of _check_nodes; YAMLError (and RecursionError) are the caller's."""
    loader = _ConfigLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found; give the path of the experiment YAML")
    try:
        doc = safe_load(p.read_text(encoding="utf-8"), str(path))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {e.problem}; fix the YAML at that line") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot parse YAML ({e})") from None
    except RecursionError:
        raise UserError(f"{path}: the YAML is nested too deeply; flatten it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of `base` and model blocks at the top level")
    return doc


def _split(doc: dict) -> tuple[dict, dict[str, dict]]:
    """(base keys, {model name: model block}); top-level scalars count as base keys."""
    base: dict = {}
    models: dict[str, dict] = {}
    for k, v in doc.items():
        if str(k) == BASE_BLOCK:
            if v is not None and not isinstance(v, dict):
                raise UserError(f"`{BASE_BLOCK}` must be a mapping of keys")
            base.update(v or {})
        elif isinstance(v, dict) and normalize(k) not in MAPPING_KEYS:
            models[str(k)] = v
        else:
            base[k] = v
    return base, models


def _model_parts(block: dict) -> tuple[dict, dict[str, dict]]:
    keys, exps = {}, {}
    for k, v in block.items():
        if isinstance(v, dict) and normalize(k) not in MAPPING_KEYS:
            exps[str(k)] = v
        else:
            keys[k] = v
    return keys, exps


def list_experiments(path: str | Path) -> dict[str, list[str]]:
    _, models = _split(load_yaml(path))
    return {name: list(_model_parts(block)[1]) for name, block in models.items()}


def _pick(name: str, available: list[str], what: str, path: str) -> None:
    if name in available:
        return
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    raise UserError(f"{path}: no {what} `{name}`{hint}; available: {', '.join(available) or '(none)'}")


def _flatten(block: dict, origin: str, out: dict, origins: dict) -> None:
    """Canonicalise one block's keys into `out`. Mappings that are not MAPPING_KEYS are groups
    (e.g. `backend_config: {training: {lr: ..}}`): their leaves are keys in their own right."""
    for k, v in block.items():
        key = normalize(k)
        if key in MAPPING_KEYS:
            if v is not None and not isinstance(v, dict):
                out[key] = v  # reported as a type error later
            else:
                merged = dict(out.get(key) or {})
                merged.update(v or {})
                out[key] = merged
            origins[key] = origin
        elif isinstance(v, dict):
            _flatten(v, origin, out, origins)
        else:
            out[key] = v
            origins[key] = origin


def parse_overrides(args: list[str]) -> list[tuple[list[str], Any]]:
    """`--a.b=v`, `--a.b v`, `a=v` -> [(["a", "b"], parsed v)], values parsed as YAML scalars."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
        elif "=" in arg:
            body = arg
        else:
            raise UserError(f"command line: unexpected argument `{arg}`; overrides look like --key=value")
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            key, raw = body, "true"  # a bare --flag means true
        try:
            value = safe_load(raw, f"command line `{arg}`") if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        path = [p for p in key.split(".") if p]
        if not path:
            raise UserError(f"command line: `{arg}` names no key; overrides look like --key=value")
        out.append((path, value))
        i += 1
    return out


def _check_groups(overrides: list[tuple[list[str], Any]], nested: dict, source: str) -> None:
    """A dotted override addresses its leaf key only through a group the YAML has (or the documented
    `backend_config`): `--anything.seed=1` must not quietly set seed."""
    problems = []
    for path, _ in overrides:
        if len(path) < 2 or normalize(path[0]) in MAPPING_KEYS or normalize(path[0]) in GROUPS:
            continue
        node = nested
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            dotted = ".".join(path)
            problems.append(f"command line: `--{dotted}`: {source} has no group `{'.'.join(path[:-1])}`; "
                            f"write --{path[-1]}=... or fix the group name")
    if problems:
        raise UserErrors(problems)


def _apply_overrides(overrides: list[tuple[list[str], Any]], out: dict, origins: dict) -> None:
    for path, value in overrides:
        head = normalize(path[0])
        if head in MAPPING_KEYS and len(path) > 1:
            node = out.setdefault(head, {})
            if not isinstance(node, dict):
                node = out[head] = {}
            for part in path[1:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            origins[head] = "command line"
        else:
            key = normalize(path[-1])  # dotted group paths address their leaf key
            out[key] = value
            origins[key] = "command line"


def _lookup(ref: str, flat: dict, nested: dict, builtins: dict):
    parts = [p for p in ref.strip().split(".") if p]
    if not parts:
        raise KeyError(ref)
    if len(parts) == 1 and parts[0] in builtins:
        return None, builtins[parts[0]]
    head = normalize(parts[0])
    if head in flat:
        node = flat[head]
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                raise KeyError(ref)
            node = node[part]
        return head if len(parts) == 1 else None, node
    node = nested  # a group path such as backend_config.training.lr
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise KeyError(ref)
        node = node[part]
    leaf = normalize(parts[-1])
    return (leaf if leaf in flat else None), node


def interpolate(flat: dict, nested: dict, source: str, builtins: dict | None = None) -> dict:
    """Resolve `${key}` / `${a.b}` everywhere; a value that is exactly `${x}` keeps x's type.
    `builtins` (${model_name}, ${exp_name}) are names that are not config keys."""
    builtins = builtins or {}
    done: dict = {}

    def resolve_key(key: str, chain: tuple[str, ...]):
        if key in done:
            return done[key]
        if key in chain:
            cycle = " -> ".join(f"${{{k}}}" for k in (*chain[chain.index(key):], key))
            raise UserError(f"{source}: interpolation cycle {cycle}; break the loop")
        done[key] = resolve_value(flat[key], (*chain, key))
        return done[key]

    def resolve_value(value, chain):
        if isinstance(value, dict):
            return {k: resolve_value(v, chain) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve_value(v, chain) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value

        def get(ref: str):
            try:
                key, raw = _lookup(ref, flat, nested, builtins)
            except KeyError:
                owner = chain[-1] if chain else "?"
                raise UserError(
                    f"{source}: `{owner}` refers to ${{{ref}}}, which is not set; define `{ref}` or fix the name"
                ) from None
            return resolve_key(key, chain) if key is not None else resolve_value(raw, chain)

        whole = _REF.fullmatch(value.strip())
        if whole:
            return get(whole.group(1))
        text = _REF.sub(lambda m: str(get(m.group(1))), value)
        if len(text) > MAX_VALUE_CHARS:
            raise UserError(f"{source}: `{chain[-1] if chain else '?'}` grows to more than {MAX_VALUE_CHARS} "
                            "characters through ${...} references; shorten it")
        return text

    for key in flat:
        resolve_key(key, ())
    return done


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _type_problems(err, source: str, origins: dict, data: dict) -> list[str]:
    out = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        key = loc[0] if loc else "?"
        if e["type"] == "missing":
            out.append(f"{source}: required key `{key}` is not set; add it to the base, model or experiment block "
                       f"or pass --{key}=...")
            continue
        where = origins.get(key, source)
        value = data.get(key)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in _RANGE_ERRORS and key in ExpConfig.model_fields:
            finite = "a finite number" if e["type"] == "finite_number" else None
            msg = "must be " + " ".join(t for t in (finite, allowed_range(key)) if t)
        out.append(f"{where}: `{'.'.join(loc)}` = {value!r}: {msg}")
    return out


def resolve(path: str | Path, model_name: str, exp_name: str, overrides: list[str] | None = None) -> Resolved:
    from pydantic import ValidationError

    source = str(path)
    doc = load_yaml(path)
    base, models = _split(doc)
    _pick(model_name, list(models), "model", source)
    model_keys, exps = _model_parts(models[model_name])
    _pick(exp_name, list(exps), f"experiment under `{model_name}`", source)

    flat: dict = {}
    origins: dict = {}
    nested: dict = {}
    for block, origin in (
        (base, f"{source}: {BASE_BLOCK}"),
        (model_keys, f"{source}: {model_name}"),
        (exps[exp_name], f"{source}: {model_name}.{exp_name}"),
    ):
        _flatten(block, origin, flat, origins)
        _deep_update(nested, block)
    parsed = parse_overrides(list(overrides or []))
    _check_groups(parsed, nested, source)
    _apply_overrides(parsed, flat, origins)
    for p, v in parsed:
        _deep_update(nested, _nest(p, v))

    problems = [
        f"{origins.get(k, source)}: unknown key `{k}`{suggestion(k)}; put trainer-only flags under `extra_args`"
        for k in flat
        if not is_known(k)
    ]
    if problems:
        raise UserErrors(problems)
    data = interpolate(flat, nested, source, {"model_name": model_name, "exp_name": exp_name})
    try:
        cfg = ExpConfig(**data)
    except ValidationError as err:
        raise UserErrors(_type_problems(err, source, origins, data)) from None
    return Resolved(cfg=cfg, source=source, model_name=model_name, exp_name=exp_name, origins=origins)


def _nest(path: list[str], value):
    node = value
    for part in reversed(path):
        node = {part: node}
    return node


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def dump_config(cfg: ExpConfig) -> str:
    """The resolved config as written to exp-config.yaml (canonical keys, every default filled in)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_resolved(path: str | Path) -> ExpConfig:
    """Read back an exp-config.yaml written by dump_config (the trainer's entry point uses this)."""
    data = load_yaml(path)
    try:
        return ExpConfig(**data)
    except Exception as e:
        raise UserError(f"{path}: not a resolved ascendfactory config ({' '.join(str(e).split())})") from None
