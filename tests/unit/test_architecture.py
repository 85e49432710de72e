"""The layering holds: kernels <- moe <- parallel <- launch, and no module imports itself back.

Walks every module of the installed packages with `ast` (imports inside functions count too:
they run sooner or later) and fails on an upward import or an import cycle, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"configs": 0, "kernels": 0, "moe": 1, "parallel": 2, "launch": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["moeflow." + ".".join(parts)] = f
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """moeflow modules `name` imports, with the parent packages Python runs on the way."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            if not t.startswith("moeflow."):
                continue
            while t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known:
                found.add(t)
                found.update(a for a in _ancestors(t) if a in known and a not in _ancestors(name) and a != name)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _layer(name: str) -> int:
    return LAYERS[name.split(".")[1]]


def test_no_upward_imports():
    upward = sorted(f"{a} imports {b}" for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a))
    assert not upward, "imports must go kernels <- moe <- parallel <- launch:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_walk_sees_the_package():
    """Guard against a walker that finds nothing (and so passes vacuously)."""
    graph = _graph()
    assert "moeflow.moe.layer" in graph and "moeflow.launch.cli" in graph
    assert "moeflow.moe.dispatch" in graph["moeflow.moe.layer"]


def test_the_installed_packages_hold_only_library_code_and_data():
    """Developer scripts live in bench/tools/, fixtures in tests/: the package dirs hold modules,
    Hydra configs and sbatch templates only, and every module is importable package code."""
    allowed = {
        "moe": {".py"},
        "kernels": {".py", ".json"},  # tuned_picks.json: shipped autotuning picks
        "parallel": {".py"},
        "launch": {".py", ".yaml"},
        "configs": {".py", ".yaml"},
        "slurm": {".py", ".j2"},
    }
    stray = [
        str(f.relative_to(ROOT))
        for pkg, exts in allowed.items()
        for f in (ROOT / pkg).rglob("*")
        if f.is_file() and "__pycache__" not in f.parts and f.suffix not in exts
    ]
    assert not stray, f"not library code or data: {stray}"
    scripts = [
        str(f.relative_to(ROOT))
        for pkg in LAYERS
        for f in (ROOT / pkg).rglob("*.py")
        if "__main__" in f.read_text() and f.name != "cli.py"
    ]
    assert not scripts, f"scripts inside the package (move them to bench/tools/): {scripts}"
