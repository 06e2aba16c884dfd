"""The `rounds` command line, run as users run it: subprocesses of `.venv/bin/rounds`.

`rounds token` mints a token the gateway's verifier accepts; `rounds up`
starts its own Ray head (separate from the test session's), serves, answers
`rounds status`, and on SIGTERM or Ctrl-C closes its clients with 1001 and
exits 0 within the seed's 3 s (BE-001.1, graceful shutdown), leaving no Ray
process behind. Every environment here is clean of `ROUNDS_*` settings and
points `ROUNDS_VAR_DIR` at a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import psutil
import pytest

from rounds.auth import AuthError, TokenVerifier
from rounds.config import Settings
from tests.client import Client
from tests.conftest import free_port

ROUNDS = Path(sys.executable).with_name("rounds")
STARTUP_TIMEOUT_S = 90  # a Ray head, its dashboard and four actors on two cores
SHUTDOWN_BUDGET_S = 3.0  # seed BE-001.1: "Graceful shutdown with 3s timeout"
RAY_DAEMONS = {"raylet", "gcs_server"}


def cli_env(var_dir: Path, **extra: str) -> dict[str, str]:
    """This process's environment minus any gateway or Ray address settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUNDS_") and k != "RAY_ADDRESS"}
    env.update(ROUNDS_VAR_DIR=str(var_dir), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROUNDS), *args], env=env, capture_output=True, text=True, timeout=timeout)


# --- rounds token --------------------------------------------------------------------


def test_token_command_prints_a_token_the_gateway_accepts(tmp_path: Path) -> None:
    done = run_cli("token", "--user", "u1", "--role", "nurse", env=cli_env(tmp_path))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"  # the token alone, for $(rounds token ...)
    assert (tmp_path / "keys" / "jwt-private.pem").exists()

    identity = TokenVerifier(Settings(var_dir=str(tmp_path))).verify(token)
    assert (identity.user_id, identity.role, identity.username) == ("u1", "nurse", "u1")
    assert abs(identity.expires_at - (time.time() + 24 * 3600)) < 60  # --ttl defaults to 24h
    assert jwt.get_unverified_header(token)["alg"] == "RS256"

    # Another machine's dev key pair does not trust it.
    with pytest.raises(AuthError, match="bad_signature"):
        TokenVerifier(Settings(var_dir=str(tmp_path / "elsewhere"))).verify(token)


def test_token_command_takes_username_and_ttl_and_refuses_a_bad_ttl(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    done = run_cli("token", "--user", "usr_7", "--role", "surgeon", "--username", "Dr. Rossi", "--ttl", "15m",
                   env=env)
    assert done.returncode == 0, done.stderr
    identity = TokenVerifier(Settings(var_dir=str(tmp_path))).verify(done.stdout.strip())
    assert identity.username == "Dr. Rossi"
    assert abs(identity.expires_at - (time.time() + 15 * 60)) < 60

    bad = run_cli("token", "--user", "usr_7", "--role", "surgeon", "--ttl", "forever", env=env)
    assert bad.returncode == 2  # argparse's usage error
    assert "--ttl" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stdout == ""


# --- rounds status / up without a gateway ----------------------------------------------


def test_status_without_a_running_gateway_says_how_to_start_one(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    done = run_cli("status", env=env)
    assert done.returncode == 1
    assert "rounds up" in done.stderr and "Traceback" not in done.stderr

    # A state file left by a gateway that died without cleaning up.
    state = tmp_path / "cluster.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state.write_text(json.dumps({"pid": dead.pid, "gcsAddress": "127.0.0.1:1", "namespace": "rounds"}))
    done = run_cli("status", env=env)
    assert done.returncode == 1
    assert "not running" in done.stderr and "Traceback" not in done.stderr
    assert not state.exists()


def test_up_refuses_a_port_something_already_listens_on(tmp_path: Path) -> None:
    # SO_REUSEPORT would let the front doors bind beside it and split its clients.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("up", "--port", str(port), env=cli_env(tmp_path))
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "in use" in done.stderr
    assert "Traceback" not in done.stderr


# --- rounds up / status / shutdown -----------------------------------------------------


@dataclass
class RunningGateway:
    process: asyncio.subprocess.Process
    port: int
    dashboard_port: int
    env: dict[str, str]
    banner: str
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def ray_daemons(self) -> list[psutil.Process]:
        """The raylet and GCS server this `rounds up` started (its descendants only:
        other Ray clusters may run on this machine)."""
        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() in RAY_DAEMONS]


@asynccontextmanager
async def rounds_up(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """`rounds up --shards 2 --frontdoors 2` in its own session, until its banner is out."""
    port, dashboard_port = free_port(), free_port()
    env = cli_env(tmp_path, ROUNDS_DASHBOARD_PORT=str(dashboard_port))
    stderr_path = tmp_path / "rounds-up.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(ROUNDS), "up", "--port", str(port), "--shards", "2", "--frontdoors", "2",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            start_new_session=True)  # its own process group, as a terminal would give it
    gateway = RunningGateway(process, port, dashboard_port, env, "", stderr_path)
    try:
        gateway.banner = await _read_banner(gateway)
        yield gateway
    finally:
        await _stop_leftover(process)


async def _read_banner(gateway: RunningGateway) -> str:
    assert gateway.process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not any(line.lstrip().startswith("Status") for line in lines):
                raw = await gateway.process.stdout.readline()
                if not raw:
                    raise AssertionError("rounds up exited during startup")
                lines.append(raw.decode())
            lines.append((await gateway.process.stdout.readline()).decode())
            lines.append((await gateway.process.stdout.readline()).decode())
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"rounds up did not start: {exc!r}\nstdout:\n{''.join(lines)}\n"
                             f"stderr:\n{gateway.stderr()}") from None
    return "".join(lines)


async def _stop_leftover(process: asyncio.subprocess.Process) -> None:
    """If a test failed before stopping the gateway: SIGTERM its group, then SIGKILL."""
    if process.returncode is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(process.wait(), wait_s)
            return
        except TimeoutError:
            continue


def http_json(url: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, json.loads(response.read())


async def all_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still alive (zombies count as gone) after up to `timeout` s."""
    deadline = time.monotonic() + timeout

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while (left := [p for p in processes if alive(p)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return left


def _sigterm(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)  # what a process manager sends


def _ctrl_c(pid: int) -> None:
    os.killpg(pid, signal.SIGINT)  # what a terminal sends: the whole foreground group, Ray included


@pytest.mark.ray  # `rounds up` starts a Ray of its own
@pytest.mark.parametrize("stop", [_sigterm, _ctrl_c], ids=["sigterm", "ctrl_c"])
async def test_rounds_up_serves_reports_status_and_drains_on_signal(tmp_path: Path, stop: Any) -> None:
    async with rounds_up(tmp_path) as gw:
        # The banner: where to connect, the dashboard, how to get a token.
        assert f"ws://127.0.0.1:{gw.port}/ws" in gw.banner
        assert f"http://127.0.0.1:{gw.dashboard_port}" in gw.banner
        assert "rounds token --user" in gw.banner

        status_code, health = await asyncio.to_thread(http_json, f"http://127.0.0.1:{gw.port}/health")
        assert status_code == 200
        assert health["status"] == "ok"
        assert health["shards"] == {"0": "up", "1": "up"}

        minted = await asyncio.to_thread(run_cli, "token", "--user", "usr_cli", "--role", "surgeon", env=gw.env)
        assert minted.returncode == 0, minted.stderr
        client = await Client.connect(gw.url, minted.stdout.strip())
        try:
            assert (await client.join("page:/patient/cli")).type == "RESOURCE_STATE"

            status = await asyncio.to_thread(run_cli, "status", env=gw.env, timeout=90)
            assert status.returncode == 0, status.stderr
            out = status.stdout
            for name in ("shard-0", "shard-1", "frontdoor-0", "frontdoor-1"):
                assert name in out, out
            assert "total: 1 connections, 1 rooms" in out, out

            daemons = gw.ray_daemons()
            assert {p.name() for p in daemons} == RAY_DAEMONS, daemons

            signalled = time.monotonic()
            stop(gw.process.pid)
            async with asyncio.timeout(SHUTDOWN_BUDGET_S + 2):
                code = await client.closed(timeout=SHUTDOWN_BUDGET_S + 2)
                closed_after = time.monotonic() - signalled
                returncode = await gw.process.wait()
                exited_after = time.monotonic() - signalled
        finally:
            await client.close()

        rest = (await gw.process.stdout.read()).decode() if gw.process.stdout else ""
        assert code == 1001, f"close code {code}\n{rest}\n{gw.stderr()}"
        assert closed_after < SHUTDOWN_BUDGET_S
        assert returncode == 0, f"exit {returncode}\n{rest}\n{gw.stderr()}"
        assert exited_after < SHUTDOWN_BUDGET_S, f"exited {exited_after:.2f}s after the signal\n{rest}"
        assert "rounds: stopped" in rest
        assert not (tmp_path / "cluster.json").exists()

        left = await all_gone(daemons, timeout=5)
        assert not left, f"Ray processes left behind: {[(p.pid, p.name()) for p in left]}"
