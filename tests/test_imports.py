"""The import graph of `qat/`: no cycles, and the quantization core imports nothing above it.

Read from the source with `ast` (module-level and function-level imports alike), so the check
sees what a reader sees.
"""

import ast
from pathlib import Path

QAT = Path(__file__).resolve().parents[1] / "qat"


def _module(path: Path) -> str:
    parts = path.relative_to(QAT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in QAT.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A module cycle, ignoring edges into packages (an `__init__` only hands names on)."""
    packages = {m for m in g if (QAT.parent / m.replace(".", "/") / "__init__.py").is_file()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m] - packages):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(graph()) is None, " -> ".join(_cycle(graph()))


def test_the_quantization_core_imports_nothing_above_it():
    above = ("qat.export", "qat.train", "qat.models", "qat.data", "lightning", "hydra", "omegaconf")
    for path in (QAT / "quant").rglob("*.py"):
        bad = sorted(i for i in _imports(path) if i.startswith(above))
        assert not bad, f"{path.name} imports {bad}"


def test_the_cycle_check_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_imports_first():
    """Each module imported first, in a fresh `qat` (torch kept loaded): a cycle through a
    package `__init__` that the graph above does not show fails here as an ImportError."""
    import importlib
    import sys

    saved = {k: v for k, v in sys.modules.items() if k == "qat" or k.startswith("qat.")}
    try:
        for name in sorted(graph()):
            if name.endswith("transformers_conv1d"):
                continue  # needs the optional transformers: covered by its own test
            for k in [k for k in sys.modules if k == "qat" or k.startswith("qat.")]:
                del sys.modules[k]
            importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k == "qat" or k.startswith("qat.")]:
            del sys.modules[k]
        sys.modules.update(saved)
