"""The package layering of README "Architecture", read from the sources with ast (nothing is imported): every
import goes to the module's own layer or a lower one, and the stages do not depend on each other in a cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "ascendfactory"

# Highest layer first; a module belongs to the first layer one of whose packages / modules holds it.
LAYERS = {
    "cli": ("ascendfactory.cli", "ascendfactory.__main__", "ascendfactory.demo", "ascendfactory.tiny"),
    "pipeline": ("ascendfactory.pipeline",),
    "stages": ("ascendfactory.data", "ascendfactory.convert", "ascendfactory.engine", "ascendfactory.launch"),
    "config": ("ascendfactory.config",),
    # errors, fsutil, progress, layout, modelinfo, families, sharding, ckpt
    "core": ("ascendfactory",),
}
RANK = {name: len(LAYERS) - i for i, name in enumerate(LAYERS)}


def layer_of(module: str) -> str:
    return next(name for name, roots in LAYERS.items()
                if any(module == r or module.startswith(r + ".") for r in roots))


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    p = PKG.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, ascendfactory module) of every import in the source, wherever it is (top level, in a function,
    under TYPE_CHECKING): `from pkg import name` counts as pkg.name when that is a module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                found.append((node.lineno, f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base))
    return list(dict.fromkeys((line, m) for line, m in found if m == "ascendfactory" or m.startswith("ascendfactory.")))


def sources():
    for path in sorted(PKG.rglob("*.py")):
        yield module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py"


def upward(module: str, source: str, is_package: bool = False) -> list[str]:
    mine = layer_of(module)
    return [f"{module}:{line} ({mine}) imports {target} ({layer_of(target)})"
            for line, target in imports_of(module, source, is_package) if RANK[layer_of(target)] > RANK[mine]]


def stage_of(module: str) -> str | None:
    return module.split(".")[1] if layer_of(module) == "stages" else None


def test_no_import_from_a_lower_layer_to_a_higher_one():
    found = [v for module, source, is_package in sources() for v in upward(module, source, is_package)]
    assert found == [], "\n".join(found)


def test_stages_depend_on_each_other_without_a_cycle():
    edges: dict[str, dict[str, str]] = {}  # stage -> stage it imports -> the first such import
    for module, source, is_package in sources():
        for line, target in imports_of(module, source, is_package):
            a, b = stage_of(module), stage_of(target)
            if a and b and a != b:
                edges.setdefault(a, {}).setdefault(b, f"{module}:{line} imports {target}")

    def path_back(start: str, stage: str, seen: tuple) -> list[str] | None:
        for nxt, why in edges.get(stage, {}).items():
            if nxt == start:
                return [why]
            if nxt not in seen and (rest := path_back(start, nxt, (*seen, nxt))):
                return [why, *rest]
        return None

    cycles = [" -> ".join(cycle) for s in sorted(edges) if (cycle := path_back(s, s, ()))]
    assert cycles == [], "\n".join(cycles)


def test_the_check_sees_imports_of_every_form():
    # the checks above would pass on a parser that found nothing: an upward import of each form is caught here
    assert imports_of("ascendfactory.config.rules", "from ascendfactory.launch.torchrun import scripts_dir") \
        == [(1, "ascendfactory.launch.torchrun")]
    assert imports_of("ascendfactory.engine.x", "def f():\n    from .. import pipeline\n") \
        == [(2, "ascendfactory.pipeline")]
    assert imports_of("ascendfactory.engine", "from . import trainer", is_package=True) \
        == [(1, "ascendfactory.engine.trainer")]
    assert upward("ascendfactory.modelinfo", "import ascendfactory.convert.hf2mg") \
        == ["ascendfactory.modelinfo:1 (core) imports ascendfactory.convert.hf2mg (stages)"]
    assert upward("ascendfactory.layout", "from ascendfactory.config.schema import ExpConfig")
    assert upward("ascendfactory.convert.stage", "from ascendfactory import pipeline")
    assert not upward("ascendfactory.config.rules", "from ascendfactory.ckpt import files")
    assert len(list(sources())) > 50 and sum(len(imports_of(m, s, p)) for m, s, p in sources()) > 200
