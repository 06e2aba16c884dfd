"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.client import Client
from tests.conftest import GatewayHandle

Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect(gateway: GatewayHandle) -> AsyncIterator[Connect]:
    """Open `/ws` clients (on the main gateway unless `on=` names another);
    all are closed at the end of the test."""
    opened: list[Client] = []

    async def open_client(user: str, role: str = "surgeon", *, on: GatewayHandle | None = None,
                          username: str | None = None, binary: bool = False) -> Client:
        target = on or gateway
        client = await Client.connect(target.url, target.token(user, role, username=username), binary=binary)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        await client.close()
