"""Start, supervise and stop a gateway on Ray.

`Gateway.start(settings)` starts a local Ray (or joins `ray_address`, or uses
the Ray this process already has), creates the named shard and front-door
actors, and runs the supervisor: a reconciliation loop on a thread that
reads every shard's address and pushes the versioned address book to every
front door each second (a restarted shard has a new port; a restarted front
door has no book). It returns once every front door reports healthy.

With `postgres_dsn` set, the same process ships the audit trail to
PostgreSQL by itself: a `rounds.audit.tail.Shipper` (a thread with its own
asyncio loop) migrates the schema and follows `{var_dir}/audit` as
`rounds audit load --follow` does. PostgreSQL down, at start or later, only
delays the loading: the events stay in the files and are loaded when it
returns. `Gateway.stop` stops it after the actors (so their last events are
loaded, within a second) and joins its thread.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import ray

from rounds.cluster.actors import ACTOR_OPTIONS, FrontDoorActor, ShardActor
from rounds.config import Settings

log = logging.getLogger(__name__)

RECONCILE_PERIOD_S = 1.0
CALL_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0  # a shard saving its documents, then every actor ending


def ray_init(settings: Settings) -> tuple[bool, str | None]:
    """Connect this process to Ray: (whether we started it, its dashboard URL)."""
    if ray.is_initialized():
        return False, None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.ray_address:
        context = ray.init(address=settings.ray_address, namespace=settings.ray_namespace,
                           logging_level=logging.WARNING, log_to_driver=False)
        return False, _http(context.dashboard_url)
    # A local head: GCS on a port the OS picks (never Redis's 6379), dashboard on loopback.
    if os.environ.get("RAY_GCS_SERVER_PORT", "").strip() == "6379":
        raise RuntimeError("RAY_GCS_SERVER_PORT=6379 would put Ray's GCS on Redis's port; unset it")
    context = ray.init(namespace=settings.ray_namespace, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=_free_port_from(settings.dashboard_port), num_cpus=os.cpu_count() or 2,
                       logging_level=logging.WARNING, log_to_driver=False)
    return True, _http(context.dashboard_url)


class PortInUseError(RuntimeError):
    """Something already listens on the gateway's port."""


def ensure_port_free(settings: Settings) -> None:
    """Refuse to start where something already listens.

    Front doors bind with SO_REUSEPORT, so binding would succeed next to a
    gateway already running there (a second `rounds up`, same user) and the
    kernel would then split clients between the two unrelated gateways:
    users in one room on different gateways never see each other.
    """
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex((host, settings.port)) == 0:
            raise PortInUseError(f"port {settings.port} on {host} is already in use; "
                                 "stop what runs there or choose another --port")


def _free_port_from(port: int) -> int:
    """`port` if nothing listens there, else the next free one (a second
    gateway on one machine must not fail on the dashboard's port)."""
    for candidate in range(port, port + 100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", candidate)) != 0:
                return candidate
    raise RuntimeError(f"no free dashboard port in {port}..{port + 99}")


def _http(url: str | None) -> str | None:
    return None if not url else (url if url.startswith("http") else f"http://{url}")


class Gateway:
    def __init__(self, settings: Settings, started_ray: bool, dashboard_url: str | None = None) -> None:
        self.settings = settings
        self.started_ray = started_ray
        self.dashboard_url = dashboard_url
        ns = settings.ray_namespace
        # `ray.remote` classes: Ray ships no types, so mypy sees the plain classes
        shard_class, frontdoor_class = cast(Any, ShardActor), cast(Any, FrontDoorActor)
        self.shards = [
            shard_class.options(name=f"shard-{i}", namespace=ns, **ACTOR_OPTIONS).remote(i, settings)
            for i in range(settings.shards)
        ]
        self.frontdoors = [
            frontdoor_class.options(name=f"frontdoor-{i}", namespace=ns, **ACTOR_OPTIONS).remote(i, settings)
            for i in range(settings.frontdoors)
        ]
        self.book: dict[int, tuple[str, int]] = {}
        self.version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shipper: Any = None  # rounds.audit.tail.Shipper when postgres_dsn is set

    # --- lifecycle ------------------------------------------------------------

    @classmethod
    def start(cls, settings: Settings, timeout_s: float = 90) -> Gateway:
        ensure_port_free(settings)
        started, dashboard_url = ray_init(settings)
        gateway = cls(settings, started, dashboard_url)
        try:
            gateway._wait_healthy(timeout_s)
        except BaseException:
            gateway.stop(drain=False)
            raise
        gateway._thread = threading.Thread(target=gateway._supervise, name="rounds-supervisor", daemon=True)
        gateway._thread.start()
        gateway.start_shipper()
        return gateway

    def start_shipper(self) -> None:
        """Follow the audit files into PostgreSQL (when `postgres_dsn` is set)."""
        if not self.settings.postgres_dsn or self.shipper is not None:
            return
        from rounds.audit.tail import Shipper

        var_dir = Path(self.settings.var_dir)
        self.shipper = Shipper(self.settings.postgres_dsn, var_dir / "audit",
                               status_file=shipper_status_file(self.settings)).start()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.reconcile()
            health = self._call_all(self.frontdoors, "health")
            if health and all(h is not None and h["status"] == "ok" for h in health):
                if self._http_health_ok():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not healthy after {timeout_s:.0f}s: {health}")
            time.sleep(0.2)

    def _http_health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, drain: bool = True) -> None:
        """Close clients with 1001, stop the shards (their documents saved,
        their audit written), end the actor processes, and Ray if we started it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if drain:
            self._call_all(self.frontdoors, "drain", timeout=2.5)
            self._call_all(self.shards, "stop", timeout=STOP_TIMEOUT_S)
        actors = [*self.frontdoors, *self.shards]
        # Each process ends as a Python process does (exit handlers run), then anything left is killed.
        ends = [actor.__ray_terminate__.remote() for actor in actors]
        ray.wait(ends, num_returns=len(ends), timeout=STOP_TIMEOUT_S)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        if self.shipper is not None:  # after the actors: their last events are in the files now
            self.shipper.stop()
            self.shipper = None
        if self.started_ray:
            ray.shutdown()

    # --- supervision ------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.wait(RECONCILE_PERIOD_S):
            try:
                self.reconcile()
            except Exception:
                log.exception("supervisor: reconcile failed")

    def reconcile(self) -> None:
        """One pass: learn shard addresses, push the book where it is stale."""
        addresses = self._call_all(self.shards, "address")
        book = dict(self.book)
        for index, address in enumerate(addresses):
            if address is not None:
                book[index] = tuple(address)
        if book != self.book:
            self.version += 1
            self.book = book
            log.info("supervisor: address book v%d %s", self.version, book)
        if self.book:
            for actor in self.frontdoors:
                actor.set_address_book.remote(self.version, self.book)

    def _call_all(self, actors: list[Any], method: str, timeout: float = CALL_TIMEOUT_S) -> list[Any]:
        """Call `method` on each actor; None where it failed or timed out."""
        refs = [getattr(a, method).remote() for a in actors]
        results: list[Any] = []
        for ref in refs:
            try:
                results.append(ray.get(ref, timeout=timeout))
            except Exception as exc:  # a dead, restarting or slow actor: report, go on
                log.warning("supervisor: %s failed: %s", method, type(exc).__name__)
                results.append(None)
        return results

    # --- views ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://{self._public_host}:{self.settings.port}/ws"

    @property
    def health_url(self) -> str:
        return f"http://{self._public_host}:{self.settings.port}/health"

    @property
    def _public_host(self) -> str:
        host = self.settings.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def pids(self) -> list[int]:
        return [p for p in self._call_all([*self.shards, *self.frontdoors], "pid") if p is not None]

    def status(self) -> dict[str, Any]:
        return {
            "shards": self._call_all(self.shards, "stats"),
            "frontdoors": self._call_all(self.frontdoors, "stats"),
            "bookVersion": self.version,
            "auditShipper": self.shipper.stats() if self.shipper is not None else None,
        }


def shipper_status_file(settings: Settings) -> Path:
    """Where the gateway's process writes its audit shipper's counters (for `rounds status`)."""
    return Path(settings.var_dir) / "audit-shipper.json"


def gcs_address() -> str:
    return str(ray.get_runtime_context().gcs_address)


def connect(address: str, namespace: str) -> None:
    """Attach this process (e.g. `rounds status`) to a running gateway's Ray."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)


def running_status(namespace: str) -> dict[str, Any]:
    """Stats of every named shard and front door in `namespace`."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace]

    def collect(prefix: str) -> list[Any]:
        chosen = sorted((n for n in names if n.startswith(prefix)), key=lambda n: int(n.rsplit("-", 1)[1]))
        refs: list[tuple[str, Any]] = [(n, ray.get_actor(n, namespace=namespace).stats.remote()) for n in chosen]
        out: list[Any] = []
        for name, ref in refs:
            try:
                out.append(ray.get(ref, timeout=CALL_TIMEOUT_S))
            except Exception as exc:
                out.append({"name": name, "error": type(exc).__name__})
        return out

    return {"shards": collect("shard-"), "frontdoors": collect("frontdoor-")}
