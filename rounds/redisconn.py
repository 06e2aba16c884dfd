"""Connections to Redis for the stores that keep their state there.

One place for the client settings every Redis store shares (timeouts, health
checks), how a store reads its Lua scripts, and the `health` answer they all
give. Which stores use Redis is the composition root's choice
(`rounds.cluster.compose`); nothing here knows a key.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import redis.asyncio as aioredis


def connect(url: str) -> aioredis.Redis:
    """A client whose replies are text (sessions, presence, locks)."""
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                   socket_connect_timeout=2, socket_timeout=5)


def connect_binary(url: str) -> aioredis.Redis:
    """A client whose replies are bytes (document states and updates)."""
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30,
                                   socket_connect_timeout=2, socket_timeout=5)


def lua(package: str, name: str) -> str:
    """The text of `lua/{name}.lua` beside the package that owns the script."""
    return resources.files(package).joinpath(f"lua/{name}.lua").read_text()


async def ping(client: aioredis.Redis, name: str) -> dict[str, Any]:
    """A store's health: up with its round-trip time, or down with the reason."""
    started = time.perf_counter()
    try:
        await client.ping()
    except Exception as exc:  # any failure is "down", with its reason
        return {"backend": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"backend": name, "ok": True, "latencyMs": round((time.perf_counter() - started) * 1000, 3)}
