"""The audit chain on another Python, and the event's other forms: the
canonical bytes without CPython's C JSON accelerator, the digest without its
builtin sha256, a time given in another zone, the null sink."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from rounds.audit.chain import LineWriter, _builtin_sha256, _canonical_encoder, canonical
from rounds.audit.events import AuditEvent, NullAuditSink, format_time

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
              st.datetimes(timezones=st.just(UTC))),  # not JSON: written as its str
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_without_the_c_json_accelerator_a_record_is_hashed_over_the_same_bytes(record) -> None:
    pure = _canonical_encoder(make=None)
    assert pure(record).encode() == canonical(record)
    assert pure(record) == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def test_without_a_builtin_sha256_hashlibs_gives_the_same_digests() -> None:
    fallback = _builtin_sha256(("_no_such_module", "json"))  # one missing, one without a sha256
    assert fallback is hashlib.sha256
    body = canonical({"eventType": "LOCK_ACQUIRED", "userId": "Zoë 🩺"})
    assert fallback(body).hexdigest() == _builtin_sha256()(body).hexdigest()


def test_a_time_given_in_another_zone_is_recorded_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 26, 11, 30, 0, 250, tzinfo=paris)
    assert format_time(moment) == "2026-11-26T10:30:00.000250Z"
    happened = AuditEvent("LOCK_ACQUIRED", "shard-0", time=moment, details={"at": moment})
    assert json.loads(LineWriter("shard-0#1").line(happened))["time"] == "2026-11-26T10:30:00.000250Z"
    shown = json.loads(happened.to_json())
    assert shown["time"] == "2026-11-26T10:30:00.000250Z" and shown["details"] == {"at": str(moment)}


def test_with_the_audit_off_events_and_flushes_are_taken_and_nothing_is_kept() -> None:
    sink = NullAuditSink()
    sink.emit(AuditEvent("LOCK_ACQUIRED", "shard-0", user_id="usr_1"))
    sink.flush()
    assert vars(sink) == {}
