"""SQLite persistence: the schema, the Store (one connection, one worker thread), transactions."""

from cmsod.store.store import Store, Tx

__all__ = ["Store", "Tx"]
