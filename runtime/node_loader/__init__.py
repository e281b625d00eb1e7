"""The node loader sidecar: one per node, owning the cache tiers remote -> SSD -> DRAM (-> GPU).

`service.NodeLoader` is the core (no HTTP); `api.py` serves it over a Unix socket; `client.py` is
what function instances use; `publisher.py` writes the node's state to Redis for the scheduler.
"""
