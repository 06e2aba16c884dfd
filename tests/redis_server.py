"""A Redis of a test's own: a `redis-server` on a free loopback port (and a
unix socket, if asked), for what must not touch the shared one (killing it,
flushing its scripts, a password).

It keeps the real clock even when the suite runs under `faketime`
(tests/calendar): libfaketime preloaded into redis-server makes it recurse
in `clock_gettime` and never answer; a Redis on another host would not share
our clock either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port

_FAKED = ("LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC", "DYLD_INSERT_LIBRARIES")


class RedisServer:
    """`durable`: an append-only file synced on every write, so that what a
    SIGKILL interrupts is still there when it starts again."""

    def __init__(self, directory: Path, *, durable: bool = False, password: str | None = None,
                 unix_socket: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.password = password
        self.socket = str(directory / "redis.sock") if unix_socket else None
        self.durable = durable
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=5,
                           socket_connect_timeout=1)

    def start(self) -> None:
        args = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.socket is not None:
            args += ["--unixsocket", self.socket]
        env = {k: v for k, v in os.environ.items() if k not in _FAKED}
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        client = self.client()
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: what a crash leaves."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        if self.process is not None:
            self.process.send_signal(how)
            self.process.wait(10)
            self.process = None
