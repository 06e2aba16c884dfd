"""The audit trail (issue #5): every critical step as an event, written to
chained NDJSON day files, verified, shipped to PostgreSQL, searched,
retained and erased.

- `events`: `AuditEvent` and the `AuditSink` Protocol (with its doubles)
- `chain`: the canonical form, the hash chain, the commitments of personal fields
- `files`: `FileAuditSink`, the day files and their housekeeping
- `loop`: the gather of one event loop's events
- `rows`: reading the day files back
- `verify`: checking the chains
- `pg`: PostgreSQL: schema, loading, search, retention
- `tail`: the shipper that follows the files into PostgreSQL
- `erase`: pseudonymising a person in files and rows
- `cli`: `rounds audit ...`
"""
