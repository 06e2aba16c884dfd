"""The stock reference y-websocket server, started beside our gateway for comparison.

Belongs here: starting `tests/interop/refserver.mjs` (the npm package
`@y/websocket-server`, pinned in `tests/interop/package.json`, installed by
`make node-deps`) on a free loopback port, waiting for its ready line,
reading the versions it runs, and stopping it. Must not be here: measuring
it (`crdt.py` does, like any y-websocket server).

The server names a document by its whole URL path, so clients use the same
`/yjs/{room}` paths as on our gateway. It exits when its stdin closes
(`--exit-with-stdin`), so it never outlives the bench, even a killed one.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rounds.bench.crdt import ServerUnavailable
from rounds.bench.plan import require_loopback_url

INTEROP = Path(__file__).resolve().parent.parent / "tests" / "interop"
LAUNCHER = INTEROP / "refserver.mjs"
PACKAGES = ("@y/websocket-server", "yjs", "y-protocols", "ws")
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 3.0
NAME = "y-websocket-ref"  # the run's name in reports: @y/websocket-server on Node.js


@dataclass(frozen=True, slots=True)
class Running:
    url: str  # ws://127.0.0.1:PORT/yjs: the base rooms are appended to
    pids: list[int]
    info: dict[str, Any]


@contextmanager
def reference_server() -> Iterator[Running]:
    """The reference server on a free loopback port, stopped on exit;
    `ServerUnavailable` says why it could not start."""
    node = shutil.which("node")
    if node is None:
        raise ServerUnavailable("node is not on PATH (the reference server is Node.js)")
    if not LAUNCHER.is_file() or not (INTEROP / "node_modules" / "@y" / "websocket-server").is_dir():
        raise ServerUnavailable(f"{LAUNCHER} or its node_modules is missing: run `make node-deps`")
    process = subprocess.Popen(
        [node, str(LAUNCHER), "--host", "127.0.0.1", "--port", "0", "--exit-with-stdin"],
        cwd=INTEROP, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        ready = _ready_line(process)
        url = require_loopback_url(f"{ready['url']}/yjs")
        info = {"server": "@y/websocket-server (refserver.mjs)", "own_gateway": False, "pids": [process.pid],
                "node": _node_version(node), "packages": _versions()}
        yield Running(url, [process.pid], info)
    finally:
        _stop(process)


def _ready_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.1)
        if readable:
            line = process.stdout.readline()
            if not line:
                break  # it exited
            try:
                ready = json.loads(line)
            except ValueError:
                continue  # not the ready line
            if isinstance(ready, dict) and ready.get("ready") and isinstance(ready.get("url"), str):
                return ready
        elif process.poll() is not None:
            break
    raise ServerUnavailable(f"the reference server did not start (exit code {process.poll()}); "
                            f"try `node {LAUNCHER}` by hand")


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()  # --exit-with-stdin: it closes its clients and exits
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    if process.stdout is not None:
        process.stdout.close()


def _node_version(node: str) -> str | None:
    try:
        return subprocess.run([node, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            out[package] = json.loads((INTEROP / "node_modules" / package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[package] = None
    return out
