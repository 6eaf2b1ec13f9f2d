"""The package's layers: imports point one way (down), and no module imports itself back in a circle.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import
is still a dependency, only a hidden one."""

import ast
from pathlib import Path

import seal_agent

PACKAGE = Path(seal_agent.__file__).parent

# Lowest first. A module may import its own layer and those listed before it.
LAYERS = [
    {"errors", "config", "progress"},
    {"documents", "model", "arc"},
    {"engine"},
    {"policy"},
    {"qa"},
    {"memory"},
    {"learning"},
    {"restem"},
    {"cluster"},
    {"agent"},
    {"service"},
    {"evaluation"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c in known:
                out.add(c)
            elif c.startswith("seal_agent.") and c.rsplit(".", 1)[0] in known:
                out.add(c.rsplit(".", 1)[0])
    out.discard(name)
    return out


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{name}: in no layer of LAYERS (add its subpackage there)")


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {n: imports(n, p, known) for n, p in found.items()}


def test_every_import_points_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        if name == "seal_agent":
            continue
        for dep in deps:
            if dep != "seal_agent" and layer(dep) > layer(name):
                wrong.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{n} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .agent import SealAgent\n"
                   "def f():\n    from .service import daemon\n")
    known = {"seal_agent.qa.m", "seal_agent.agent", "seal_agent.service", "seal_agent.service.daemon"}
    assert imports("seal_agent.qa.m", src, known) == set()  # relative to seal_agent.qa: .agent is qa.agent
    assert imports("seal_agent.m", src, known | {"seal_agent.m"}) == {"seal_agent.agent", "seal_agent.service",
                                                                       "seal_agent.service.daemon"}


def test_the_http_api_never_reaches_the_daemon():
    # routes get a serving backend (service.serving), as vLLM's routers get a handler, never the engine
    g = graph()
    seen, todo = set(), [n for n in g if n.startswith("seal_agent.service.api")]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(g.get(n, ()))
    assert "seal_agent.service.daemon" not in seen
