"""The composition root: settings in, a shard or a front door out, with the
stores and transports the settings name.

The one place that turns settings into running objects, shared by the Ray
actors (`rounds.cluster.actors`) and the one-process gateway used by tests
and benchmarks (`rounds.cluster.inprocess`), so both run exactly the same
code. A URL in the settings means the real service (Redis, RabbitMQ,
PostgreSQL); none means the embedded default, so `rounds up` runs with no
server at all.
"""

from __future__ import annotations

from pathlib import Path

from rounds.audit.events import AuditSink, NullAuditSink
from rounds.audit.files import FileAuditSink
from rounds.audit.loop import loop_audit
from rounds.auth import TokenVerifier
from rounds.config import Settings
from rounds.frontdoor.server import FrontDoor
from rounds.frontdoor.sessions import MemorySessions, SessionStore
from rounds.ids import FrontDoorId, ShardId
from rounds.relay.transport import RelayTransport
from rounds.shard.documents.history import DocHistory
from rounds.shard.documents.store import DocStore, FileDocStore
from rounds.shard.locks.store import LockStore, MemoryLockStore
from rounds.shard.presence.mirror import MemoryPresence, PresenceMirror
from rounds.shard.service import ShardService

AUDIT_MODES = ("files", "off")


def audit_sink(settings: Settings) -> AuditSink:
    """The sink `settings.audit` names: the NDJSON day files, or none ("off")."""
    if settings.audit not in AUDIT_MODES:
        raise ValueError(f"audit must be one of {', '.join(AUDIT_MODES)}, not {settings.audit!r}")
    if settings.audit == "off":
        return NullAuditSink()
    return FileAuditSink(Path(settings.var_dir) / "audit", fsync=settings.audit_fsync)


def make_shard(index: int, settings: Settings, audit: AuditSink | None = None,
               relay: RelayTransport | None = None) -> ShardService:
    """`relay`: a transport to use instead of the one the settings name (the
    one-process gateway's memory twin)."""
    return ShardService(ShardId(index), presence_mirror(settings, f"{settings.ray_namespace}/shard-{index}"),
                        _loop_audit(settings, audit), lock_store(settings), doc_store(settings), settings,
                        doc_history(settings), relay or relay_transport(settings))


def make_frontdoor(index: int, settings: Settings, audit: AuditSink | None = None,
                   relay: RelayTransport | None = None) -> FrontDoor:
    return FrontDoor(FrontDoorId(index), settings, TokenVerifier(settings), session_store(settings),
                     _loop_audit(settings, audit), relay or relay_transport(settings))


def _loop_audit(settings: Settings, audit: AuditSink | None) -> AuditSink:
    """One service's audit: its own queue over `audit` (or the configured sink), written every `audit_gather_ms`."""
    return loop_audit(audit or audit_sink(settings), settings.audit_gather_ms / 1000)


# --- stores and transports -----------------------------------------------------------


def session_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        from rounds import redisconn
        from rounds.frontdoor.sessions_redis import RedisSessions

        return RedisSessions(redisconn.connect(settings.redis_url), settings.session_ttl_ms, settings.idle_timeout_ms)
    return MemorySessions(settings.session_ttl_ms, settings.idle_timeout_ms)


def presence_mirror(settings: Settings, owner: str) -> PresenceMirror:
    if settings.redis_url:
        from rounds import redisconn
        from rounds.shard.presence.mirror_redis import RedisPresence

        return RedisPresence(redisconn.connect(settings.redis_url), owner)
    return MemoryPresence()


def lock_store(settings: Settings) -> LockStore:
    if settings.redis_url:
        from rounds import redisconn
        from rounds.shard.locks.store_redis import RedisLockStore

        return RedisLockStore(redisconn.connect(settings.redis_url))
    return MemoryLockStore()


def doc_store(settings: Settings) -> DocStore:
    if settings.redis_url:
        from rounds import redisconn
        from rounds.shard.documents.store_redis import RedisDocStore

        return RedisDocStore(redisconn.connect_binary(settings.redis_url))
    return FileDocStore(Path(settings.var_dir) / "docs")


def doc_history(settings: Settings) -> DocHistory | None:
    """PostgreSQL history of document updates, when `postgres_dsn` is set."""
    return DocHistory(settings.postgres_dsn) if settings.postgres_dsn else None


def relay_transport(settings: Settings) -> RelayTransport | None:
    """RabbitMQ when `amqp_url` is set and the relay is not "off"; else none:
    every front door is reached over its direct link."""
    if settings.amqp_url and settings.relay != "off":
        from rounds.relay.amqp import AmqpRelay

        return AmqpRelay(settings.amqp_url, settings.ray_namespace)
    return None
