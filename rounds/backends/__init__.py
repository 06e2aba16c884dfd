"""Backends behind small Protocols: an embedded default and a real service each.

`build_backends(settings)` picks them: a missing URL means the embedded
(memory/file) implementation, so `rounds up` runs with no server at all.
"""
