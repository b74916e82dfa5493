"""The package's modules import each other without cycles, counting imports inside functions too: a cycle that
only a lazy import keeps from failing today fails as soon as someone moves that import to the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "b2trl"


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (a ``from x import y`` counts as importing
    ``x.y`` when that is a module, else ``x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    # a submodule's own packages are imported before it anyway: importing from them closes no cycle
    ancestors = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return {t for t in targets if t in modules and t != name and t not in ancestors}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph(package: Path) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_a_cycle_closed_by_a_lazy_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from .a import A\n",
        "a.py": "from . import b\nA = 1\n",
        "b.py": "def f():\n    from .sub.c import C\n    return C\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\nfrom ..a import A as C\n",
        "d.py": "import pkg.a\n",
    }
    for name, text in sources.items():
        (package / name).write_text(text)
    assert _cycles(_graph(package)) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_no_import_cycle_among_the_packages_modules():
    graph = _graph(PACKAGE)
    assert "b2trl.accelerator" in graph["b2trl.trainer"]  # the graph sees the imports
    assert _cycles(graph) == []
