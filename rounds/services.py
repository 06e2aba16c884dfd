"""Build the shard and front-door services with their backends.

The one place that turns settings into running objects, shared by the Ray
actors (`rounds.cluster`) and the in-process gateway used by tests and
benchmarks, so both run exactly the same code.
"""

from __future__ import annotations

from pathlib import Path

from rounds.frontdoor.server import FrontDoor
from rounds.audit.events import AuditSink, NullAuditSink
from rounds.audit.files import FileAuditSink
from rounds.audit.loop import loop_audit
from rounds.auth import TokenVerifier
from rounds.backends import factory
from rounds.config import Settings
from rounds.ids import FrontDoorId, ShardId
from rounds.shard.service import ShardService


AUDIT_MODES = ("files", "off")


def audit_sink(settings: Settings) -> AuditSink:
    """The sink `settings.audit` names: the NDJSON day files, or none ("off")."""
    if settings.audit not in AUDIT_MODES:
        raise ValueError(f"audit must be one of {', '.join(AUDIT_MODES)}, not {settings.audit!r}")
    if settings.audit == "off":
        return NullAuditSink()
    return FileAuditSink(Path(settings.var_dir) / "audit", fsync=settings.audit_fsync)


def make_shard(index: int, settings: Settings, audit: AuditSink | None = None) -> ShardService:
    return ShardService(ShardId(index), factory.presence_mirror(settings, f"{settings.ray_namespace}/shard-{index}"),
                        _loop_audit(settings, audit), factory.lock_store(settings),
                        factory.doc_store(settings), settings, factory.doc_history(settings))


def make_frontdoor(index: int, settings: Settings, audit: AuditSink | None = None) -> FrontDoor:
    return FrontDoor(FrontDoorId(index), settings, TokenVerifier(settings),
                     factory.session_store(settings), _loop_audit(settings, audit))


def _loop_audit(settings: Settings, audit: AuditSink | None) -> AuditSink:
    """One service's audit: its own queue over `audit` (or the configured sink), written every `audit_gather_ms`."""
    return loop_audit(audit or audit_sink(settings), settings.audit_gather_ms / 1000)
