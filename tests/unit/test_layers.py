"""Layers point down (STYLE.md, habits 4 and 15; docs/architecture.md, "Import rules").

Checked on the source with `ast`, each module's own imports (a lazy import
inside a function counts too):

- the base (`rounds/`: protocol, audit, relay, auth, config, ids, ...)
  imports none of the processes or the tools: not `rounds.shard`,
  `rounds.frontdoor`, `rounds.cluster`, `rounds.bench`;
- the wire formats and the link's vocabulary (`rounds.protocol`) sit at the
  bottom: they import only each other, `rounds.ids` and `rounds.config`;
- a shard and a front door never import each other, nor what composes
  them (`rounds.cluster`) or the benchmarks;
- a capability inside the shard (presence, locks, documents) never imports
  the shard service that composes it;
- only `rounds.cluster` imports Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_purity import PACKAGE_DIRS, imports_of

ROOTS = {"rounds.shard": "shard", "rounds.frontdoor": "frontdoor", "rounds.cluster": "cluster",
         "rounds.bench": "bench"}


def project_modules() -> dict[str, Path]:
    """Every module of the project: dotted name -> file."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rest = path.relative_to(folder).with_suffix("").parts
            if package == "rounds" and rest and rest[0] in {"shard", "frontdoor", "cluster", "bench"}:
                continue  # not under rounds/ on disk; listed by their own package
            parts = rest[:-1] if rest[-1] == "__init__" else rest
            found[".".join((package, *parts))] = path
    return found


MODULES = project_modules()


def layer_of(module: str) -> str:
    for package in ROOTS:
        if module == package or module.startswith(package + "."):
            return package
    return "rounds"


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(module: str, forbidden: list[str], allowed_project: list[str] | None = None) -> list[str]:
    names = imports_of(module, MODULES[module])
    bad = [n for n in names if any(under(n, f) for f in forbidden)]
    if allowed_project is not None:
        bad += [n for n in names if under(n, "rounds") and not any(under(n, a) for a in allowed_project)]
    return sorted(set(bad))


def test_the_module_list_covers_every_package() -> None:
    layers = {layer_of(m) for m in MODULES}
    assert layers == {"rounds", *ROOTS} and len(MODULES) > 60


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "rounds"))
def test_the_base_imports_no_process_and_no_tool(module: str) -> None:
    assert violations(module, list(ROOTS)) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if under(m, "rounds.protocol")))
def test_the_wire_formats_sit_at_the_bottom(module: str) -> None:
    assert violations(module, [], ["rounds.protocol", "rounds.ids", "rounds.config"]) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "rounds.shard"))
def test_the_shard_imports_neither_the_front_door_nor_what_composes_it(module: str) -> None:
    assert violations(module, ["rounds.frontdoor", "rounds.cluster", "rounds.bench"]) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == "rounds.frontdoor"))
def test_the_front_door_imports_neither_the_shard_nor_what_composes_it(module: str) -> None:
    assert violations(module, ["rounds.shard", "rounds.cluster", "rounds.bench"]) == []


CAPABILITIES = ("rounds.shard.presence", "rounds.shard.locks", "rounds.shard.documents")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if any(under(m, c) for c in CAPABILITIES)))
def test_a_capability_never_imports_the_service_that_composes_it(module: str) -> None:
    assert violations(module, ["rounds.shard.service"]) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) != "rounds.cluster"))
def test_only_the_cluster_package_imports_ray(module: str) -> None:
    assert violations(module, ["ray"]) == []
