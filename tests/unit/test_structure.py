"""The package's shape: protocol code never touches a link, and no module
imports another that (directly or not) imports it back.

Every import counts, also those inside functions: a lazy import hides a
circle from Python, not from the reader.
"""

import ast
import pathlib

import arcbox_net

PACKAGE = pathlib.Path(arcbox_net.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name, path):
    """The arcbox_net modules ``name`` imports (packages resolved to modules
    where a ``from package import module`` names one)."""
    is_package = path.name == "__init__.py"
    known = dict(_modules())
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("arcbox_net"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("arcbox_net"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path) for name, path in _modules()}


def test_the_graph_sees_the_package():
    assert "arcbox_net.framer" in GRAPH["arcbox_net.dispatch"]
    assert "arcbox_net.tcp.connection" in GRAPH["arcbox_net.tcp.nat"]
    assert len(GRAPH) > 30


def test_protocol_code_never_imports_a_link():
    for name, imports in GRAPH.items():
        if name.startswith(("arcbox_net.tcp", "arcbox_net.protocols")):
            links = sorted(i for i in imports if i.startswith("arcbox_net.link"))
            assert not links, f"{name} imports {links}: protocols reach the guest via the framer"


def test_no_import_circles():
    cycles = []
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            # A module importing its own package's __init__ is not a circle
            # of code; the package only re-exports.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
