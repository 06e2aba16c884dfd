"""Presence: who is in which room, in which mode, since when (story BE-001.2).

- `machine`: `Presence`, the pure rooms machine
- `mirror`: the `PresenceMirror` Protocol (the seed's Redis copy) and its memory twin
- `mirror_redis`: the seed's keys on Redis
"""
