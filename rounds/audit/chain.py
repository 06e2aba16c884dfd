"""The chain: the canonical form a line is hashed in, and the commitments
that keep a person's identifiers erasable without breaking it.

Each line of a writer (a source in one process) is chained to its previous
line by sha256 over the canonical JSON (docs/audit.md: change the form only
with that document). Personal fields are hashed as salted commitments, so
`rounds audit erase` can replace a value by a pseudonym and every chain still
verifies. `LineWriter` composes a line without building the object twice.
No I/O here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import json.encoder
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, cast

from rounds.audit.events import AuditEvent, format_time

_C_MAKE_ENCODER = json.encoder.c_make_encoder  # type: ignore[attr-defined]  # CPython's C accelerator, not in typeshed


def _canonical_encoder(make: Callable[..., Any] | None = _C_MAKE_ENCODER) -> Callable[[Any], str]:
    """`json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)`.

    `dumps` builds a new C encoder on every call (about 2 of an emit's 12 µs);
    this one is built once. Without a `markers` dict it does not look for cycles
    (1 µs more): a cyclic `details` ends in RecursionError, which emit logs.
    `make` is the C accelerator's encoder maker, None on a Python built
    without it (the tests pass None to hold both to the same bytes).
    """
    if make is None:  # no C speedups: the same bytes, slower
        encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
        return encoder.encode
    c_encoder = make(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", True, False, True)
    return lambda o: "".join(c_encoder(o, 0))


_encode = _canonical_encoder()


def canonical(record: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no spaces, ASCII only (docs/audit.md)."""
    return _encode(record).encode()


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


def _builtin_sha256(modules: tuple[str, ...] = ("_sha2", "_sha256")) -> Callable[[bytes], _Hash]:
    """CPython's own sha256 (`_sha2` from 3.12, `_sha256` before): the same
    digest as `hashlib.sha256`, without OpenSSL 3's cost of setting up a
    context per call. On the bench host (no SHA instructions) it hashes a
    40-byte commitment in 0.9 µs against 1.5, and a 650-byte line in 3.5
    against 4.8; an audit line takes four. `modules`: where to look for it
    (the tests name none that exists, as on a Python without them)."""
    for name in modules:
        try:
            return cast(Callable[[bytes], _Hash], importlib.import_module(name).sha256)
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def chain_hash(prev_hash: str | None, body: bytes) -> str:
    """sha256 hex of the previous hash (empty for seq 1) followed by the canonical body."""
    return _sha256((prev_hash or "").encode() + body).hexdigest()


# --- identifiers under a commitment (erasable without breaking the chain) ---

# The fields that name a person, as `salt`/`erased` keys: a dotted name is a
# member of `details`. The chain hashes a salted commitment of each in place
# of its value, so `rounds audit erase` can replace the value by a pseudonym
# and keep the commitment (docs/audit.md, "Erasure").
PERSONAL_FIELDS: tuple[str, ...] = ("userId", "sessionId", "details.lockedBy", "details.remote")
SALT_BYTES = 16
_TOP_FIELDS = tuple(name for name in PERSONAL_FIELDS if "." not in name)
_DETAIL_FIELDS = tuple(name[8:] for name in PERSONAL_FIELDS if name.startswith("details."))


def personal_value(record: dict[str, Any], name: str) -> Any:
    if name.startswith("details."):
        details = record.get("details")
        return details.get(name[8:]) if isinstance(details, dict) else None
    return record.get(name)


def set_personal_value(record: dict[str, Any], name: str, value: Any) -> None:
    """Set a field in place; a `details` member in a copy of `details`, so the caller's copy is untouched."""
    if name.startswith("details."):
        details = record.get("details")
        record["details"] = {**(details if isinstance(details, dict) else {}), name[8:]: value}
    else:
        record[name] = value


def commitment(salt: str, value: str) -> str:
    """`sha256:` + hex sha256 of the salt (hex, as ASCII), `:`, and the value in UTF-8."""
    return "sha256:" + _sha256(f"{salt}:{value}".encode("utf-8", "surrogatepass")).hexdigest()


def sealed_body(record: dict[str, Any]) -> bytes:
    """The bytes the chain hashes for a line (its object without `hash`).

    Without `salt` and `erased` members that is the canonical JSON of the
    object. Otherwise those two members are left out, and each personal
    field is replaced by its commitment: `erased[name]` when the field was
    erased, else `commitment(salt[name], value)`; a field with neither is
    hashed as it is (lines written before identifiers were salted).
    """
    salts, erased = record.get("salt"), record.get("erased")
    if salts is None and erased is None:
        return canonical(record)
    body = {k: v for k, v in record.items() if k != "salt" and k != "erased"}
    salts = salts if isinstance(salts, dict) else {}
    erased = erased if isinstance(erased, dict) else {}
    for name in PERSONAL_FIELDS:
        if isinstance(erased.get(name), str):
            set_personal_value(body, name, erased[name])
            continue
        value, salt = personal_value(body, name), salts.get(name)
        if isinstance(value, str) and isinstance(salt, str):
            set_personal_value(body, name, commitment(salt, value))
    return canonical(body)


def hashed_line(record: dict[str, Any], digest: str) -> bytes:
    """A line as the writer writes it: the canonical object with `hash` appended last."""
    return canonical(record)[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


class LineWriter:
    """One chain: a source in this process. `seq` and `prev` move only under the sink's lock."""

    __slots__ = ("name", "seq", "prev")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.prev: str | None = None

    def line(self, event: AuditEvent) -> bytes:
        """The event's next line of this chain, newline included; each personal
        field present gets a salt of its own.

        The line is the canonical object written out member by member, in the
        sorted order `canonical` gives it, twice where a person is named: with
        commitments in place of the personal values (the bytes hashed) and
        with the values (the bytes written), then `salt` and `hash` appended.
        Composed from the same encoded members, that costs a fifth to a
        quarter less than encoding the whole dict and substituting the values
        back (24.5 against 31 µs for a lock denial on the bench machine); the
        unit tests hold it to `sealed_body`, the verifier's rule."""
        salts: list[str] = []  # '"name":"salt"' members, in PERSONAL_FIELDS order
        user, user_sealed = _personal(event.user_id, "userId", salts)
        session, session_sealed = _personal(event.session_id, "sessionId", salts)
        details = event.details
        if details and not _str_keyed(details):
            details = _with_str_keys(details)
        if details and any(name in details for name in _DETAIL_FIELDS):
            sealed_details = dict(details)
            values = []  # (the commitment as encoded, the value as encoded)
            for name in _DETAIL_FIELDS:
                value = details.get(name)
                if isinstance(value, str):
                    sealed_details[name] = sealed = _sealed(value, "details." + name, salts)
                    values.append(('"' + sealed + '"', _json_string(value)))
            hashed = shown = _encode(sealed_details)
            for sealed, value in values:  # a commitment hashes a fresh salt: it occurs once
                shown = shown.replace(sealed, value, 1)
        else:
            hashed = shown = _encode(details)
        seq = self.seq + 1
        middle = (',"eventId":' + _member(event.event_id) + ',"eventType":' + _member(event.event_type)
                  + ',"outcome":' + _member(event.outcome)
                  + ',"prevHash":' + ("null" if self.prev is None else '"' + self.prev + '"')
                  + ',"resourceId":' + _member(event.resource_id) + ',"seq":' + str(seq) + ',"sessionId":')
        tail = (',"source":' + _member(event.source) + ',"time":"' + format_time(event.time)
                + '","userId":')
        writer = ',"writer":' + _member(self.name)
        body = ('{"details":' + hashed + middle + session_sealed + tail + user_sealed + writer + "}").encode()
        digest = chain_hash(self.prev, body)
        self.seq, self.prev = seq, digest
        if salts:
            body = ('{"details":' + shown + middle + session + tail + user + writer
                    + ',"salt":{' + ",".join(salts) + "}}").encode()
        return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


_CONTAINERS = (dict, list, tuple)


def _str_keyed(value: Any) -> bool:
    """Whether every dict in `value`, at any depth, has only str keys (0.3 µs
    for a usual `details`). Only then do the sorted keys written stay sorted
    once read back, where every key is a str: {2: .., 10: ..} sorts 2 before
    10, "10" before "2"; mixed int and str keys do not sort at all."""
    kind = type(value)
    if kind is dict:
        for key, member in value.items():
            if type(key) is not str or (type(member) in _CONTAINERS and not _str_keyed(member)):
                return False
        return True
    return all(_str_keyed(member) for member in value if type(member) in _CONTAINERS)


def _with_str_keys(value: Any) -> Any:
    """A copy of `value` whose dicts have the keys JSON would write for them
    (1 → "1", True → "true", None → "null"; any other key its `str`): the
    object as a reader of the line will see it. Keys that collide keep the
    last member, as JSON's reader does."""
    kind = type(value)
    if kind is dict:
        return {(key if type(key) is str else _json_key(key)): _with_str_keys(member)
                for key, member in value.items()}
    if kind is list or kind is tuple:
        return [_with_str_keys(member) for member in value]
    return value


def _json_key(key: Any) -> str:
    return json.dumps(key) if key is None or isinstance(key, (int, float)) else str(key)


def _member(value: Any) -> str:
    """A value as canonical JSON writes it."""
    return _json_string(value) if type(value) is str else _encode(value)


def _sealed(value: str, name: str, salts: list[str]) -> str:
    """The commitment of a personal value under a fresh salt, its salt recorded in `salts`."""
    salt = _salts.take()
    salts.append(f'"{name}":"{salt}"')
    return commitment(salt, value)


def _personal(value: Any, name: str, salts: list[str]) -> tuple[str, str]:
    """A top-level field's member as written and as hashed (a commitment when it names someone)."""
    shown = _member(value)
    if not isinstance(value, str):
        return shown, shown
    return shown, '"' + _sealed(value, name, salts) + '"'


_json_string = json.encoder.encode_basestring_ascii  # a str as canonical JSON writes it, quotes included


class _SaltPool:
    """Salts of SALT_BYTES random bytes, as hex, cut from one `os.urandom`
    read of 256 at a time (a read per salt would be a system call per field).
    A forked child refills before its first salt, so it never repeats the parent's."""

    def __init__(self) -> None:
        self._refill()
        os.register_at_fork(after_in_child=self._refill)

    def _refill(self) -> None:
        self._lock = threading.Lock()  # sinks of several threads share the pool
        self._hex = os.urandom(256 * SALT_BYTES).hex()
        self._at = 0

    def take(self) -> str:
        with self._lock:
            if self._at >= len(self._hex):
                self._hex, self._at = os.urandom(256 * SALT_BYTES).hex(), 0
            at = self._at
            self._at = at + 2 * SALT_BYTES
            return self._hex[at:at + 2 * SALT_BYTES]


_salts = _SaltPool()
