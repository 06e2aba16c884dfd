"""Shared Y.js documents and their awareness (story BE-001.4).

- `machine`: `Documents`, the in-memory documents (apply, state, revision)
- `awareness`: `RoomAwareness`, cursors and selections of one room
- `shell`: `DocShell`, loading, the writer of acknowledged updates, snapshots, unloading
- `store`: the `DocStore` Protocol, its memory twin and the embedded file store
- `store_redis`: documents on Redis
- `history`: every acknowledged update in PostgreSQL, and reading a document as it was
- `cli`: `rounds doc show`
"""
