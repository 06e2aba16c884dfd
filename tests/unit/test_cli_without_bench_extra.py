"""The runtime install has no bench extra (psutil, matplotlib, numpy, k6):
`rounds` still works and `rounds bench` says what to install."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.test_purity import closure

# psutil made unimportable, as in an install without `rounds[bench]`
WITHOUT_PSUTIL = ("import sys; sys.modules['psutil'] = None; "
                  "from rounds.cluster.cli import main; sys.exit(main(sys.argv[1:]))")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_PSUTIL, *args], capture_output=True, text=True, timeout=60)


def test_rounds_runs_without_the_bench_extra_and_bench_names_it() -> None:
    helped = run("--help")
    assert helped.returncode == 0 and "bench" in helped.stdout
    bench = run("bench", "presence", "--users", "10")
    assert bench.returncode == 2
    assert "pip install 'rounds[bench]'" in bench.stderr and "psutil" in bench.stderr


def test_nothing_the_gateway_runs_imports_a_bench_dependency() -> None:
    """Our own imports, followed through the project (Ray itself brings psutil)."""
    graph = closure("rounds.cluster.actors") | closure("rounds.cluster.cli") | closure("rounds.cluster.inprocess")
    found = {f"{importer} imports {name}" for importer, names in graph.items() for name in names
             if name.split(".")[0] in {"psutil", "matplotlib", "numpy", "k6"}
             and not importer.startswith("rounds.bench")}
    assert not found
