"""The machines and the pure modules do no I/O (STYLE.md, habit 1).

Checked on the source with `ast`, following imports inside the project, so a
machine cannot pull in asyncio through a helper module; then once for real in
a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncio", "ray", "redis", "aio_pika", "asyncpg", "websockets", "uvloop"}
# `rounds.shard` lives in `shard/` and so on (pyproject.toml, package-dir)
PACKAGE_DIRS = {
    "rounds.shard": ROOT / "shard",
    "rounds.frontdoor": ROOT / "frontdoor",
    "rounds.cluster": ROOT / "cluster",
    "rounds.bench": ROOT / "bench",
    "rounds": ROOT / "rounds",
}
PURE = ["rounds.shard.presence.machine", "rounds.shard.events", "rounds.routing", "rounds.ids", "rounds.protocol.ws",
        "rounds.shard.documents.machine", "rounds.shard.documents.awareness", "rounds.protocol.yjs",
        "rounds.shard.locks.machine", "rounds.relay.stream",
        "rounds.protocol.messages", "rounds.protocol.link", "rounds.shard.documents.persistence",
        "rounds.shard.admission", "rounds.shard.ordering", "rounds.shard.room_state", "rounds.frontdoor.session"]


def source_of(module: str) -> Path | None:
    """The file of a project module, or None when it is not ours."""
    for package, folder in PACKAGE_DIRS.items():
        if module == package or module.startswith(package + "."):
            rest = module[len(package):].lstrip(".").split(".") if module != package else []
            base = folder.joinpath(*rest) if rest else folder
            for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
                if candidate is not None and candidate.is_file():
                    return candidate
            return None
    return None


def imports_of(module: str, path: Path) -> set[str]:
    """Every module named by an import statement, anywhere in the file."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            # `from rounds import ids` imports the submodule `rounds.ids`
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def closure(module: str) -> dict[str, set[str]]:
    """Module -> what it imports, for the module and every project module it reaches
    (parent packages included: importing `rounds.shard.events` runs `shard/__init__.py`)."""
    seen: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = source_of(name)
        if path is None:
            continue
        seen[name] = imports_of(name, path)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(n for n in seen[name] | set(parents) if n not in seen)
    return seen


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_io_library_even_indirectly(module: str) -> None:
    graph = closure(module)
    assert module in graph, f"{module} not found under {ROOT}"
    offenders = {
        f"{importer} imports {name}"
        for importer, names in graph.items() for name in names
        if name.split(".")[0] in FORBIDDEN
    }
    assert not offenders


def test_the_purity_check_would_see_an_indirect_asyncio_import() -> None:
    # the link's stream is meant to use asyncio; the checker must notice it
    graph = closure("rounds.protocol.stream")
    assert any(name == "asyncio" for name in graph["rounds.protocol.stream"])


def test_the_shard_machines_reach_their_helpers_through_the_package_name() -> None:
    # `shard.events` as a top-level name only works from the repository root
    # and would make a second copy of every event class.
    for module in ("rounds.shard.presence.machine", "rounds.protocol.link"):
        names = imports_of(module, source_of(module))
        assert not any(n == "shard" or n.startswith("shard.") for n in names), module


def test_importing_the_pure_modules_loads_no_io_library() -> None:
    code = (
        "import sys\n"
        f"import {', '.join(PURE)}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "[]"
