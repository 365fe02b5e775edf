"""Import boundaries: service -> protocol <- worker -> selprune_core. The gateway never imports the
worker (nor torch), the wire contract imports only stdlib and pydantic, and selprune_core imports nothing
of ours nor of the web/queue stack.

Runtime checks import in a fresh interpreter (this test process has torch loaded already); static checks
parse the sources with `ast`, which also sees imports hidden inside functions.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "selprune_core", "transformers")
CORE_FORBIDDEN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "rq",
    "pydantic_settings",
    "service",
    "worker",
    "protocol",
)
PACKAGES = ("protocol", "selprune_core", "worker", "service", "selprune", "bench")
CORE_MODULES = sorted(p.stem for p in (ROOT / "selprune_core").glob("*.py") if p.stem != "__init__")


def loaded_after(code: str) -> list[str]:
    """Top-level package names in sys.modules after running `code` in a fresh interpreter."""
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def imports(path: Path) -> list[tuple[str, ast.AST, list[ast.AST]]]:
    """(imported module, import node, enclosing nodes) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: list[tuple[str, ast.AST, list[ast.AST]]] = []

    def visit(node: ast.AST, parents: list[ast.AST]) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node, parents) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from protocol import keys` imports the module protocol.keys (a name that is no module
            # resolves to its package where that matters, in _module_graph).
            found.extend(
                (f"{base}.{alias.name}" if _top(base) in PACKAGES else base, node, parents)
                for alias in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child, [*parents, node])

    visit(tree, [])
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _lazy(parents: list[ast.AST]) -> bool:
    return any(
        isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef) or _is_type_checking_block(p) for p in parents
    )


def _top(name: str) -> str:
    return name.split(".")[0]


# Runtime --------------------------------------------------------------------------------------------
def test_gateway_import_leaves_torch_out():
    loaded = loaded_after("import service.main, service.__main__\nservice.main.create_app")
    assert not set(HEAVY) & set(loaded), f"importing the gateway loaded {set(HEAVY) & set(loaded)}"


def test_wire_contract_imports_light():
    modules = ", ".join(
        f"protocol.{p.stem}" for p in (ROOT / "protocol").glob("*.py") if p.stem != "__init__"
    )
    loaded = loaded_after(f"import protocol, {modules}")
    assert not {*HEAVY, "redis", "fastapi", "worker", "service"} & set(loaded)


def test_core_imports_no_web_or_queue_stack():
    """Each core module in turn; a forbidden package is blamed on the first module that brought it in."""
    code = (
        "import importlib\nblame = {}\n"
        f"for name in ['selprune_core'] + ['selprune_core.' + m for m in {CORE_MODULES!r}]:\n"
        "    importlib.import_module(name)\n"
        f"    for bad in {CORE_FORBIDDEN!r}:\n"
        "        if bad in sys.modules and bad not in blame:\n"
        "            blame[bad] = name\n"
        "print(json.dumps(blame))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, json\n" + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    blame = json.loads(proc.stdout.strip().splitlines()[-1])
    assert blame == {}, f"core pulled in the web/queue stack: {blame}"


# Static ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path", sorted((ROOT / "service").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_gateway_never_imports_the_worker(path):
    for name, node, _ in imports(path):
        assert _top(name) not in (*HEAVY, "worker"), f"{path.name}:{node.lineno} imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "service" / "routes").glob("*.py")), ids=lambda p: p.name)
def test_no_router_imports_another(path):
    """Shared route helpers live in service modules of their own (job_accept, sse, deltas)."""
    for name, node, _ in imports(path):
        assert not name.startswith("service.routes."), f"{path.name}:{node.lineno} imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "protocol").rglob("*.py")), ids=lambda p: p.name)
def test_wire_contract_imports_only_stdlib_and_pydantic(path):
    for name, node, parents in imports(path):
        top = _top(name)
        if top in sys.stdlib_module_names or top in ("__future__", "pydantic", "protocol"):
            continue
        # A client type may be named for annotations; the operations take the client as an argument.
        assert top == "redis" and any(_is_type_checking_block(p) for p in parents), (
            f"{path.name}:{node.lineno} imports {name}: the wire contract is stdlib and pydantic only"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "selprune_core").rglob("*.py")), ids=lambda p: p.name)
def test_core_sources_import_nothing_of_ours_and_read_no_environment(path):
    for name, node, _ in imports(path):
        assert _top(name) not in CORE_FORBIDDEN, f"{path.name}:{node.lineno} imports {name}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
            assert not (isinstance(node.value, ast.Name) and node.value.id == "os"), (
                f"{path.name}:{node.lineno} reads the environment; settings belong to worker/ and service/"
            )


# Structure ------------------------------------------------------------------------------------------
MAX_MODULE_LINES = 400


def _module_graph() -> dict[str, set[str]]:
    """Our modules and the modules each imports, at top level, inside functions or for type checking."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, _, _ in imports(path):
            # `from pkg import name` counts as importing pkg.name when that is a module.
            for candidate in (imported, imported.rsplit(".", 1)[0]):
                if candidate in modules and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_even_behind_function_level_imports():
    assert _cycles(_module_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these along their concepts: {long}"
