"""The shape of the package (issue 20), checked so that it stays: modules a reader can hold in their head, no import
cycles, a trainer that names no backend, and backend rules read only from the specs.

    .venv/bin/python -m pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dist_ft"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every dist_ft module `name` imports, function-local imports included (a lazy import still ties the two)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                target = f"{base}.{alias.name}"
                deps.add(target if target in mods else base)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in mods and d != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert _cycles(graph) == []


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PKG.parent)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_the_training_loop_reads_top_to_bottom_and_names_no_backend():
    tree = ast.parse((PKG / "train" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    loop = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert loop.end_lineno - loop.lineno + 1 < 100
    for path in (PKG / "train").rglob("*.py"):
        assert "deepspeed" not in path.read_text().lower(), path


# A strategy name compared or sliced: `strategy == "fsdp"`, `in ("zero1", ...)`, `.startswith("zero")`,
# `strategy[-1]`. Outside the backend packages and the spec registry, rules come from the specs.
_NAME_RULE = re.compile(r"""(==|!=|\bin\b|startswith\()\s*\(?\s*["'](ddp|fsdp|zero\d?)["']|strategy\[-1\]""")


def test_the_name_rule_catches_a_comparison():
    for line in ('if d.strategy == "fsdp":', 'x = strategy in ("fsdp", "zero3")', 'strategy.startswith("zero")',
                 "stage = int(strategy[-1])"):
        assert _NAME_RULE.search(line), line
    assert not _NAME_RULE.search('if strategy == "bfd":')


def test_no_module_decides_by_strategy_name():
    allowed = {PKG / "distributed" / "spec.py"} | set((PKG / "distributed").glob("*/__init__.py"))
    offenders = []
    for path in PKG.rglob("*.py"):
        if path in allowed:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _NAME_RULE.search(code):
                offenders.append(f"{path.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
