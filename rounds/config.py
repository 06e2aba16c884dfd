"""One typed settings object, read once at start and passed down.

Sources, later ones winning: defaults, a TOML file (`--config` or
`ROUNDS_CONFIG`), then `ROUNDS_*` environment variables (`ROUNDS_PORT`,
`ROUNDS_REDIS_URL`, `ROUNDS_JWT_ISSUER`, ...). Only `load_settings` looks at
the environment, and only through the mapping it is given. Field names carry
their units. A backend URL left unset means the embedded default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EDITOR = "editor"
VIEWER = "viewer"
MODES = (EDITOR, VIEWER)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """How tokens are checked. With neither key configured the dev pair is trusted."""

    public_key_path: str | None = None  # PEM public key (production)
    jwks_path: str | None = None  # JWKS file: several keys chosen by `kid`
    issuer: str | None = None  # required `iss` when set
    audience: str | None = None  # required `aud` when set
    leeway_s: int = 0  # clock skew allowed on `exp`


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8765
    shards: int = 2
    frontdoors: int = 2
    ray_address: str | None = None  # join this Ray cluster instead of starting one
    ray_namespace: str = "rounds"
    dashboard_port: int = 8265
    var_dir: str = "var"  # dev keys, snapshots, audit files
    redis_url: str | None = None
    amqp_url: str | None = None  # RabbitMQ of the cross-node relay (rounds.relay); none: every front door direct
    relay: str = "auto"  # with amqp_url: "auto" relays to front doors on other nodes, "always" to all, "off" to none
    node_id: str | None = None  # this process's node for the relay; default Ray's node id, "local" without Ray
    postgres_dsn: str | None = None
    audit: str = "files"  # "files": NDJSON day files under var_dir/audit; "off": no audit trail (benchmarks only)
    # audit files: "interval" (<= 1 s lost on power cut), "always", "never" (docs/audit.md)
    audit_fsync: str = "interval"
    audit_gather_ms: int = 20  # a shard's or front door's audit events are written together this often (docs/audit.md)
    heartbeat_interval_ms: int = 25_000  # WebSocket ping interval, also told to clients
    ping_timeout_ms: int = 20_000
    idle_timeout_ms: int = 300_000  # no frame from the client for this long: closed
    session_ttl_ms: int = 3_600_000  # `user:{id}:session` TTL in Redis
    max_connections_per_frontdoor: int = 10_000
    # Container objects allocated (net) between two young garbage collections in a gateway
    # process (Python's default). Higher: fewer pauses while thousands connect, but longer
    # ones, which the lock p99 feels (docs/benchmarks.md, "Garbage collection").
    gc_young_threshold: int = 700
    max_frame_bytes: int = 262_144  # larger client frames get ERROR TOO_LARGE
    max_rooms_per_connection: int = 100
    lock_ttl_ms: int = 30_000  # a lock not renewed for this long expires (seed BE-001.3)
    lock_max_ttl_ms: int = 300_000  # the most a LOCK_ACQUIRE may ask for with `ttlMs`
    max_update_bytes: int = 262_144  # one Y.js update (also bounded by max_frame_bytes on /ws)
    max_document_bytes: int = 16 * 1024 * 1024  # a document's encoded state; updates past it get TOO_LARGE
    doc_snapshot_delay_ms: int = 2_000  # after a change, the document is snapshotted this much later
    doc_log_max_entries: int = 1_000  # ...or sooner, once this many updates wait in its log
    doc_idle_unload_ms: int = 300_000  # a document nobody joined or changed for this long leaves memory
    # Roles absent from this map may use every mode (DESIGN.md, wire protocol).
    role_modes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"observer": (VIEWER,), "auditor": (VIEWER,)}
    )
    jwt: JwtSettings = field(default_factory=JwtSettings)

    @property
    def keys_dir(self) -> Path:
        return Path(self.var_dir) / "keys"

    def allowed_modes(self, role: str) -> tuple[str, ...]:
        return self.role_modes.get(role, MODES)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from an optional TOML file and `ROUNDS_*` variables."""
    env = env or {}
    path = path or env.get("ROUNDS_CONFIG")
    raw: dict[str, Any] = tomllib.loads(Path(path).read_text()) if path else {}
    jwt_raw = dict(raw.pop("jwt", {}))
    roles = raw.pop("roles", None)
    raw.update(_from_env(Settings, "ROUNDS_", env, skip=frozenset({"jwt", "role_modes"})))
    jwt_raw.update(_from_env(JwtSettings, "ROUNDS_JWT_", env))
    if roles is not None:
        raw["role_modes"] = {role: tuple(modes) for role, modes in roles.items()}
    unknown = set(raw) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    for name, mode_list in raw.get("role_modes", {}).items():
        if not set(mode_list) <= set(MODES):
            raise ValueError(f"role {name!r}: modes must be among {MODES}")
    settings = Settings(**{k: _coerce(Settings, k, v) for k, v in raw.items()}, jwt=JwtSettings(**jwt_raw))
    if settings.gc_young_threshold < 1:
        raise ValueError("gc_young_threshold must be at least 1")
    return settings


def _from_env(cls: type, prefix: str, env: Mapping[str, str],
              skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name.upper()
        if f.name not in skip and key in env:
            out[f.name] = _coerce(cls, f.name, env[key])
    return out


def _coerce(cls: type, name: str, value: Any) -> Any:
    hint = typing.get_type_hints(cls)[name]
    args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    if value in ("", None) and type(None) in args:
        return None
    if int in args and not isinstance(value, int):
        return int(str(value).replace("_", ""))
    return value
