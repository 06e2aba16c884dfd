"""The cross-node relay (story BE-001.5): a shard's deliveries to front doors
on other nodes, in order and each once.

- `stream`: the pure stream machines (`RelayOut`, `RelayIn`, `Circuit`)
- `transport`: the `RelayTransport` Protocol and its memory twin (`MemoryRelay`)
- `amqp`: the RabbitMQ transport
- `shard_side`: `RelayShell`, a shard's sending side
- `frontdoor_side`: `FrontDoorRelay`, a front door's receiving side
"""
