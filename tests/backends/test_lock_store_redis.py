"""The Redis lock store's own connection (story BE-001.3) where the shared
suite (test_lock_store.py) does not take it: a password, a unix socket, a
script cache flushed under it, a connection that cannot be set up, and peers
that misbehave in ways a real Redis does not.

A Redis of this module's own (a password, a unix socket) serves the first
group, so flushing its scripts disturbs nobody; a tiny asyncio server on
127.0.0.1 that speaks just enough RESP plays the misbehaving peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from rounds import redisconn
from rounds.ids import ResourceId
from rounds.protocol.messages import LockId
from rounds.shard.locks.events import GrantFailed, GrantStored, StoreGrant, StoreRelease
from rounds.shard.locks.store import StoreAnswer, lock_key
from rounds.shard.locks.store_redis import RedisLockStore, _Conn
from tests.backends.test_lock_store import CONN, ROOM, T0, TTL, USR1, RedisHarness, ask, grant, release
from tests.client import eventually
from tests.redis_server import RedisServer

PASSWORD = "s3cret"
NO_RETRY = Retry(NoBackoff(), 0)  # for `health()`: redis-py would otherwise retry a failing PING for seconds


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A password-protected Redis on a free loopback port and a unix socket,
    stopped when the module is done."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="rounds-locks-redis-") as directory:
        server = RedisServer(Path(directory), password=PASSWORD, unix_socket=True)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def rid() -> ResourceId:
    return ResourceId(f"input-field-123-{uuid.uuid4().hex[:8]}")


async def granted_and_released(store: RedisLockStore, rid: ResourceId) -> None:
    """One lock's life over `store`'s connection."""
    try:
        result = await grant(store, rid, "L1")
        assert isinstance(result, GrantStored), result
        await release(store, rid, "L1")
    finally:
        await store.aclose()


# --- how the lock connection reaches Redis ---------------------------------------------


def test_a_client_over_tls_is_refused_when_the_store_is_made() -> None:
    client = aioredis.Redis(ssl=True)
    with pytest.raises(ValueError, match="TCP or a unix socket, not SSLConnection"):
        RedisLockStore(client)


async def test_the_lock_connection_authenticates_with_the_clients_password(own_redis: RedisServer,
                                                                          rid: ResourceId) -> None:
    await granted_and_released(RedisLockStore(aioredis.Redis(port=own_redis.port, password=PASSWORD)), rid)


async def test_the_lock_connection_authenticates_with_an_acl_user_and_password(own_redis: RedisServer,
                                                                              rid: ResourceId) -> None:
    url = f"redis://default:{PASSWORD}@127.0.0.1:{own_redis.port}/0"
    await granted_and_released(RedisLockStore(redisconn.connect(url)), rid)


async def test_the_lock_connection_goes_over_a_unix_socket_to_the_clients_database(own_redis: RedisServer,
                                                                                  rid: ResourceId) -> None:
    store = RedisLockStore(aioredis.Redis(unix_socket_path=own_redis.socket, password=PASSWORD, db=3))
    admin = own_redis.client()
    try:
        assert isinstance(await grant(store, rid, "L1"), GrantStored)
        assert admin.execute_command("SELECT", 3) and admin.get(lock_key(rid)) == USR1
        await release(store, rid, "L1")
    finally:
        admin.close()
        await store.aclose()


async def test_a_wrong_password_fails_what_was_asked_and_is_logged(own_redis: RedisServer, rid: ResourceId,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = RedisLockStore(aioredis.Redis(port=own_redis.port, password="wrong", retry=NO_RETRY))
    try:
        failed = await grant(store, rid, "L1")
        assert isinstance(failed, GrantFailed) and "WRONGPASS" in failed.reason
        assert any("connection setup failed" in r.getMessage() for r in caplog.records)
        assert (await store.health())["lockConnection"]["connected"] is False
    finally:
        await store.aclose()


async def test_after_a_script_flush_one_request_fails_and_the_scripts_are_loaded_again(
        own_redis: RedisServer, rid: ResourceId) -> None:
    store = RedisLockStore(aioredis.Redis(port=own_redis.port, password=PASSWORD))
    admin = own_redis.client()
    try:
        assert isinstance(await grant(store, rid, "L1"), GrantStored)
        admin.script_flush()  # an operator's SCRIPT FLUSH, or a Redis that lost its script cache
        other = ResourceId(f"{rid}-other")
        failed = await grant(store, other, "L2")
        assert isinstance(failed, GrantFailed) and "NOSCRIPT" in failed.reason
        # on the same connection, the requests after it find the scripts again
        await release(store, rid, "L1")
        assert admin.get(lock_key(rid)) is None
        assert isinstance(await grant(store, other, "L2"), GrantStored)
        await release(store, other, "L2")
        assert [c["name"] for c in admin.client_list()].count(store.connection_name) == 1
    finally:
        admin.close()
        await store.aclose()


async def test_a_request_made_after_an_answered_one_gets_its_own_full_time_to_be_answered(
        own_redis: RedisServer, rid: ResourceId) -> None:
    """The connection's one timer was set for the first request; when it
    fires, the request now in front is not failed before its own deadline."""
    timeout_s = 1.0
    store = RedisLockStore(aioredis.Redis(port=own_redis.port, password=PASSWORD), timeout_s=timeout_s)
    admin = own_redis.client()
    try:
        assert isinstance(await grant(store, rid, "L1"), GrantStored)
        await asyncio.sleep(timeout_s / 2)  # the timer set for the first is due well before the next's deadline
        admin.execute_command("CLIENT", "PAUSE", int(3 * timeout_s * 1000), "WRITE")  # Redis stalls the next
        asked = time.monotonic()
        failed = await grant(store, ResourceId(f"{rid}-other"), "L2")
        waited = time.monotonic() - asked
        assert isinstance(failed, GrantFailed) and failed.reason.startswith("TimeoutError"), failed
        assert waited >= 0.9 * timeout_s  # its own deadline, not the first request's
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        await store.aclose()


# --- a connection that cannot be set up ----------------------------------------------


class Secret:
    """A password wrapper handed over where text was expected (a settings bug)."""

    def __repr__(self) -> str:
        return "Secret(**)"


def give_back_on_failure(store: RedisLockStore, released: list[StoreAnswer | None]) -> list[StoreAnswer | None]:
    """What the lock machine does with a failed grant: ask for a release by
    lock id (it may have landed). Returns the list the grant's answer goes to."""
    answers: list[StoreAnswer | None] = []

    def done(answer: StoreAnswer | None) -> None:
        answers.append(answer)
        if isinstance(answer, GrantFailed):
            store.submit(StoreRelease(answer.resource_id, answer.lock_id, USR1), released.append)

    store.submit(StoreGrant(ResourceId("input-field-123"), LockId("L1"), USR1, TTL, T0, T0 + TTL, CONN, ROOM),
                 done)
    return answers


async def test_the_release_asked_for_by_a_failed_grant_is_tried_again_and_answered() -> None:
    # Redis refuses connections: the grant fails, and so does the release the
    # machine asks for from that answer, on an attempt of its own; neither waits forever
    store = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=1, retry=NO_RETRY), timeout_s=0.5)
    released: list[StoreAnswer | None] = []
    try:
        answers = give_back_on_failure(store, released)
        await eventually(lambda: released, 1.0, "the release answered")
        assert isinstance(answers[0], GrantFailed) and released == [None]
        assert (await store.health())["lockConnection"]["waiting"] == 0
    finally:
        started = time.monotonic()
        await store.aclose()
        assert time.monotonic() - started < 0.2  # nothing left waiting for a connection


async def test_an_impossible_port_fails_grants_and_is_logged_with_its_stack(
        rid: ResourceId, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisLockStore(aioredis.Redis(host="127.0.0.1", port=70_000), timeout_s=0.5)
    try:
        failed = await grant(store, rid, "L1")
        assert isinstance(failed, GrantFailed) and failed.reason.startswith("OverflowError")
        [record] = [r for r in caplog.records if r.getMessage() == "lock store: connecting failed"]
        assert record.exc_info is not None  # not a network failure: a configuration bug, with its stack
    finally:
        await store.aclose()


async def test_a_password_that_cannot_be_sent_drops_the_half_made_connection(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisLockStore(aioredis.Redis(port=own_redis.port, password=Secret()), timeout_s=0.5)
    admin = own_redis.client()
    released: list[StoreAnswer | None] = []
    try:
        answers = give_back_on_failure(store, released)
        await eventually(lambda: released, 1.0, "the release answered")
        assert isinstance(answers[0], GrantFailed) and answers[0].reason.startswith("TypeError")
        assert any(r.getMessage() == "lock store: connecting failed" for r in caplog.records)
        # the connections opened for the grant and the release were closed, not left on the server
        await eventually(lambda: len(admin.client_list()) == 1, 1.0, "only the admin connected")
        assert (await store.health())["lockConnection"]["connected"] is False
    finally:
        admin.close()
        await store.aclose()


# --- peers that misbehave ----------------------------------------------------------------


class FakeRedis:
    """Just enough of Redis for the lock connection: OK to its setup, the SHA
    of each script it loads, and `grant_reply` (then `trailer`) to each
    EVALSHA. Counts the lock connections it served (they name themselves)."""

    def __init__(self, grant_reply: bytes, trailer: bytes = b"") -> None:
        self.grant_reply = grant_reply
        self.trailer = trailer
        self.lock_connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65_536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                writer.write(self._answer(command))
        writer.close()

    def _answer(self, command: list[bytes]) -> bytes:
        match command[0].upper():
            case b"EVALSHA":
                return self.grant_reply + self.trailer
            case b"CLIENT":
                self.lock_connections += command[1].upper() == b"SETNAME"
                return b"+OK\r\n"
            case b"SCRIPT":
                sha = hashlib.sha1(command[2]).hexdigest().encode()
                return b"$%d\r\n%s\r\n" % (len(sha), sha)
            case _:
                return b"+OK\r\n"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def peer_factory() -> AsyncIterator[list[FakeRedis]]:
    peers: list[FakeRedis] = []
    yield peers
    for peer in peers:
        peer.close()


async def store_on(peers: list[FakeRedis], grant_reply: bytes, trailer: bytes = b"") -> RedisLockStore:
    peer = FakeRedis(grant_reply, trailer)
    peers.append(peer)
    return RedisLockStore(aioredis.Redis(host="127.0.0.1", port=await peer.start()), timeout_s=0.5)


async def test_a_reply_that_is_not_redis_protocol_fails_the_request_and_drops_the_connection(
        peer_factory: list[FakeRedis], rid: ResourceId, caplog: pytest.LogCaptureFixture) -> None:
    store = await store_on(peer_factory, b"@not redis\r\n")
    try:
        failed = await grant(store, rid, "L1")
        assert isinstance(failed, GrantFailed) and failed.reason.startswith("ProtocolError")
        assert any("Protocol error" in r.getMessage() for r in caplog.records)
        # a reply after garbage could not be matched to its request: the next one gets a new connection
        assert isinstance(await grant(store, rid, "L2"), GrantFailed)
        assert peer_factory[0].lock_connections == 2
    finally:
        await store.aclose()


async def test_a_reply_nobody_asked_for_drops_the_connection_and_the_next_request_reconnects(
        peer_factory: list[FakeRedis], rid: ResourceId, caplog: pytest.LogCaptureFixture) -> None:
    store = await store_on(peer_factory, b"*2\r\n:1\r\n:7\r\n", trailer=b"+OK\r\n")
    try:
        assert await grant(store, rid, "L1") == GrantStored(rid, LockId("L1"), 7)

        async def dropped() -> bool:
            return (await store.health())["lockConnection"]["connected"] is False

        await eventually(dropped, 1.0, "the connection dropped")
        assert any("a reply nobody asked for" in r.getMessage() for r in caplog.records)
        assert await grant(store, rid, "L2") == GrantStored(rid, LockId("L2"), 7)
        assert peer_factory[0].lock_connections == 2
    finally:
        await store.aclose()


# --- the callers' bugs, and the guards of the connection -------------------------------------


async def test_a_reply_handler_that_raises_is_logged_and_the_next_reply_still_arrives(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    tag = f"lk-{uuid.uuid4().hex[:8]}"
    first, second = ResourceId(f"input-a-{tag}"), ResourceId(f"input-b-{tag}")
    harness = RedisHarness(redis_url)
    store = harness.store

    def broken(answer: StoreAnswer | None) -> None:
        raise RuntimeError("a bug in the caller")

    try:
        store.submit(StoreGrant(first, LockId("La"), USR1, TTL, T0, T0 + TTL, CONN, ROOM), broken)
        assert isinstance(await ask(store, StoreGrant(second, LockId("Lb"), USR1, TTL, T0, T0 + TTL, CONN, ROOM)),
                          GrantStored)
        [record] = [r for r in caplog.records if r.getMessage() == "lock store reply handler failed"]
        assert record.exc_info is not None and record.levelno == logging.ERROR
        assert await harness.holder(first) == USR1  # the request itself went through
    finally:
        await harness.aclose(tag)


async def test_a_connection_that_is_not_open_fails_what_is_written_to_it_from_the_loop(redis_url: str) -> None:
    # the store writes only to a connection it knows open; this guard keeps a
    # mistake there from raising into the shell's request
    store = RedisLockStore(redisconn.connect(redis_url))
    never_opened = _Conn(store._pipe)
    answers: list[object] = []
    try:
        never_opened.write(hiredis.pack_command(("PING",)), answers.append)
        assert answers == []
        await eventually(lambda: answers, 1.0, "answered")
        assert isinstance(answers[0], ConnectionError)
        never_opened.close()  # nothing to close: no error either
    finally:
        await store.aclose()


async def test_the_loss_of_a_connection_that_is_not_the_stores_leaves_the_stores_in_use(redis_url: str,
                                                                                       rid: ResourceId) -> None:
    store = RedisLockStore(redisconn.connect(redis_url))
    reader = redisconn.connect(redis_url)
    try:
        assert isinstance(await grant(store, rid, "L1"), GrantStored)
        [before] = [c["id"] for c in await reader.client_list() if c["name"] == store.connection_name]
        _Conn(store._pipe).connection_lost(None)  # e.g. an attempt that timed out as it connected
        await release(store, rid, "L1")
        assert [c["id"] for c in await reader.client_list() if c["name"] == store.connection_name] == [before]
    finally:
        await reader.aclose()
        await store.aclose()
