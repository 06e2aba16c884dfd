"""Shared fixtures: real Redis, one local Ray per test session, gateways on it.

Ray starts once (it takes several seconds) and every gateway of the session
runs on it in its own Ray namespace; whatever these fixtures start, they
stop. Redis is the real server (`ROUNDS_TEST_REDIS_URL`, default database
15, flushed at the start of the session).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from rounds.auth import mint_token, private_key_for_dev
from rounds.config import JwtSettings, Settings

REDIS_URL = os.environ.get("ROUNDS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_DSN = os.environ.get("ROUNDS_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the session's Ray, however indirectly, is marked `ray`
    (a test that starts Ray in a subprocess, `rounds up`, says so itself):
    `-m "not ray"` then runs what can run without Ray, e.g. under a shifted
    clock (tests/calendar), where Ray cannot start."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); `make test` starts it")
    client.flushdb()
    client.close()
    return REDIS_URL


async def require_postgres() -> None:
    """Skip the calling test when the tests' PostgreSQL is not reachable."""
    try:
        await (await asyncpg.connect(POSTGRES_DSN, timeout=3)).close()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_DSN}: {exc}")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A PostgreSQL schema of the test's own, dropped with everything in it afterwards."""
    await require_postgres()
    admin = await asyncpg.connect(POSTGRES_DSN, timeout=3)
    name = f"rounds_test_{uuid.uuid4().hex[:10]}"
    await admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA {name} CASCADE")
        await admin.close()


@pytest.fixture
async def db(schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test's own schema, the audit tables migrated into it."""
    from rounds.audit.pg import connect, migrate

    conn = await connect(POSTGRES_DSN, schema)
    await migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def var_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rounds-test-") as root:
        yield Path(root)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(namespace="rounds-tests", include_dashboard=False, num_cpus=2,
             logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


class GatewayHandle:
    """A gateway on the session's Ray, with what tests need to talk to it."""

    def __init__(self, settings: Settings) -> None:
        from rounds.cluster.launch import Gateway

        self.settings = settings
        self.gateway = Gateway.start(settings)
        self.url = self.gateway.url
        self._key = private_key_for_dev(settings)

    def token(self, user: str, role: str = "surgeon", **kwargs: object) -> str:
        jwt = self.settings.jwt
        kwargs.setdefault("issuer", jwt.issuer)
        kwargs.setdefault("audience", jwt.audience)
        return mint_token(self._key, user_id=user, role=role, **kwargs)

    @property
    def audit_dir(self) -> Path:
        return Path(self.settings.var_dir) / "audit"

    def audit_text(self) -> str:
        """Every audit file of this gateway, concatenated (NDJSON)."""
        return "".join(p.read_text() for p in sorted(self.audit_dir.glob("audit-*.ndjson")))

    def audit_events(self, event_type: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Audit records so far, filtered by type and top-level field values."""
        text = self.audit_text()
        # A line being appended right now may be read half-written: leave it for the next poll.
        complete = text[: text.rfind("\n") + 1]
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return [r for r in records if (event_type is None or r["eventType"] == event_type)
                and all(r.get(k) == v for k, v in fields.items())]

    async def wait_audit(self, event_type: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """The first matching audit record, polling: other processes write the files.

        Async so that the test's own clients keep answering pings meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.audit_events(event_type, **fields)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event_type} audit record with {fields} after {timeout}s")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.gateway.stop(drain=True)


def gateway_settings(var_root: Path, name: str, **changes: object) -> Settings:
    var_dir = var_root / name
    var_dir.mkdir(parents=True, exist_ok=True)
    base = Settings(port=free_port(), var_dir=str(var_dir), ray_namespace=f"rounds-test-{name}")
    return base.replace(**changes)


@pytest.fixture(scope="session")
def gateway(ray_session: None, redis_url: str, var_root: Path) -> Iterator[GatewayHandle]:
    """The main gateway: 2 shards, 2 front doors sharing a port, Redis on."""
    handle = GatewayHandle(gateway_settings(var_root, "main", shards=2, frontdoors=2, redis_url=redis_url))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def tight_gateway(ray_session: None, redis_url: str, var_root: Path) -> Iterator[GatewayHandle]:
    """Short timeouts, a small connection cap and issuer/audience checks."""
    handle = GatewayHandle(gateway_settings(
        var_root, "tight", shards=1, frontdoors=1, redis_url=redis_url,
        idle_timeout_ms=1500, heartbeat_interval_ms=400, ping_timeout_ms=400,
        max_connections_per_frontdoor=4, max_frame_bytes=4096,
        jwt=JwtSettings(issuer="https://idp.hospital.test", audience="rounds"),
    ))
    yield handle
    handle.stop()


@pytest.fixture
def uid() -> str:
    """A short unique suffix so tests sharing a gateway never share rooms or users."""
    return uuid.uuid4().hex[:8]
