"""The package arrows of DESIGN.md and the layers inside supervisor/, checked by reading
every module's imports (module level and inside functions alike): no import cycle, and no
import against an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "discovery", "proxy", "supervisor")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _resolve(name: str) -> str | None:
    """The module of ours that ``name`` (a module or a name in one) refers to."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue   # annotations only: never imported at run time
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        for n in names:
            target = _resolve(n)
            # a submodule importing its own package is no edge: the package is imported first
            if target is not None and target != module and not _in(module, target):
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                cycles.append(sorted(component))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("importer, forbidden, why", [
    pytest.param("config", ("discovery", "proxy", "supervisor"), "config imports nothing of ours", id="config"),
    pytest.param("discovery", ("proxy", "supervisor"), "discovery is below proxy and supervisor", id="discovery"),
    pytest.param("proxy", ("supervisor", "discovery.dns", "discovery.catalog"),
                 "the proxy reads the catalog through discovery's client only", id="proxy"),
    pytest.param("discovery.dns", ("supervisor", "proxy", "discovery.catalog"), "DNS runs alone", id="dns"),
    pytest.param("supervisor", ("proxy", "discovery.dns", "discovery.catalog"),
                 "the supervisor starts them as processes", id="supervisor"),
    pytest.param("supervisor.core", ("supervisor.daemon", "supervisor.commands", "supervisor.runtime",
                                     "supervisor.cli", "discovery"), "the core is pure", id="core"),
    pytest.param("supervisor.runtime", ("supervisor.daemon", "supervisor.commands", "supervisor.core",
                                        "supervisor.cli", "discovery"), "runtimes know only config", id="runtime"),
    pytest.param("supervisor.commands", ("supervisor.daemon", "supervisor.cli"),
                 "commands are clients, never the daemon", id="commands"),
    pytest.param("supervisor.daemon", ("supervisor.cli",), "the daemon is composed by the cli", id="daemon"),
    pytest.param("supervisor.secrets", ("supervisor.daemon", "supervisor.commands", "supervisor.cli",
                                        "supervisor.runtime", "discovery"), "secrets know only config", id="secrets"),
])
def test_arrows(importer: str, forbidden: tuple[str, ...], why: str) -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _in(m, importer)
                 for t in targets if _in(t, *forbidden))
    assert not bad, f"{why}: {bad}"


def test_the_core_does_no_io() -> None:
    """No module of the pure core imports what does I/O or runs a loop."""
    io = ("asyncio", "aiohttp", "consul", "docker", "socket", "subprocess", "os", "httptools", "uvloop")
    bad = []
    for module, path in MODULES.items():
        if not _in(module, "supervisor.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in io]
    assert not bad, bad


def test_the_graph_is_read() -> None:
    """The walk sees the imports it checks (a broken walk would pass every test above)."""
    assert "supervisor.core.reconcile" in GRAPH["supervisor.daemon.supervisor"]
    assert "config" in GRAPH["supervisor.core.reconcile"]
    assert "supervisor.commands.apply" in GRAPH["supervisor.commands.rollout"]   # a function-level import
