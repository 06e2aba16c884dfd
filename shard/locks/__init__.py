"""Field locks: one holder per resource, expiry, fencing tokens (story BE-001.3).

- `machine`: `Locks`, the pure machine
- `events`: what it takes from the store and asks of it
- `shell`: `LockShell`, its asyncio shell in the shard (store calls, the expiry timer, adoption)
- `store`: the `LockStore` Protocol and its memory twin
- `store_redis`: the seed's keys on Redis, one Lua script per step (`lua/`)
"""
