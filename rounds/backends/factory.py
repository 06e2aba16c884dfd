"""Choose each backend from the settings: a URL means the real service."""

from __future__ import annotations

from pathlib import Path

from rounds.backends.base import PresenceMirror, SessionStore
from rounds.backends.docs import DocStore, FileDocStore
from rounds.backends.history import DocHistory
from rounds.backends.locks import LockStore, MemoryLockStore
from rounds.backends.memory import MemoryPresence, MemorySessions
from rounds.config import Settings


def session_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        from rounds.backends import redis as redis_backend

        return redis_backend.RedisSessions(redis_backend.connect(settings.redis_url),
                                           settings.session_ttl_ms, settings.idle_timeout_ms)
    return MemorySessions(settings.session_ttl_ms, settings.idle_timeout_ms)


def presence_mirror(settings: Settings, owner: str) -> PresenceMirror:
    if settings.redis_url:
        from rounds.backends import redis as redis_backend

        return redis_backend.RedisPresence(redis_backend.connect(settings.redis_url), owner)
    return MemoryPresence()


def lock_store(settings: Settings) -> LockStore:
    if settings.redis_url:
        from rounds.backends import redis as redis_backend
        from rounds.backends.locks import RedisLockStore

        return RedisLockStore(redis_backend.connect(settings.redis_url))
    return MemoryLockStore()


def doc_store(settings: Settings) -> DocStore:
    if settings.redis_url:
        from rounds.backends.docs import RedisDocStore, connect_binary

        return RedisDocStore(connect_binary(settings.redis_url))
    return FileDocStore(Path(settings.var_dir) / "docs")


def doc_history(settings: Settings) -> DocHistory | None:
    """PostgreSQL history of document updates, when `postgres_dsn` is set."""
    if settings.postgres_dsn:
        from rounds.backends.history import DocHistory

        return DocHistory(settings.postgres_dsn)
    return None
