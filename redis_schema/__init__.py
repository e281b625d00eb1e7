"""The whole Redis key space of sllm-faas, as code: key builders (keys.py), the typed records with their one
encoder and decoder each (records.py), and the schema version with its upgrades (upgrade.py).

Every key is documented with a redis-cli example in redis_schema/SCHEMA.md. Values are plain
hash fields, strings or JSON: nothing is pickled, everything reads with HGETALL/SMEMBERS/ZRANGE/XRANGE.
"""

from sllm_faas.redis_schema.keys import SCHEMA_VERSION, Keys

__all__ = ["SCHEMA_VERSION", "Keys"]
