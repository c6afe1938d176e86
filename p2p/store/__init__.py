"""The adapter store: hypernets, one PEFT folder (or only an embedding) per user, manifests committed by `CURRENT`.

Modules, one idea each: `layout` (where things live), `objects` (atomic and conditional object
I/O), `lease` (one writer at a time), `runs` (the commit protocol), `manifest` (rows, parts, the
reader's index), `tombstones` (deleted users), `plan` (a refresh's decisions), `deletion`, `gc`,
`adapter_store` (the object the rest of p2p uses).
"""

from p2p.store.adapter_store import DEFAULT_LEASE_TTL_S, HYPERNET_FILES, MARKER, AdapterStore, digest
from p2p.store.errors import (
    AdapterCorrupt,
    AdapterNotFound,
    LeaseHeld,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    UserDeleted,
)
from p2p.store.lease import Lease
from p2p.store.manifest import embedding_digest
from p2p.store.runs import MODES, Committed, Pending, new_run_id
from p2p.store.tombstones import user_hash

__all__ = [
    "DEFAULT_LEASE_TTL_S", "HYPERNET_FILES", "MARKER", "MODES", "AdapterCorrupt", "AdapterNotFound", "AdapterStore",
    "Committed", "Lease", "LeaseHeld", "Pending", "StoreDamaged", "StoreError", "StoreUnavailable", "UserDeleted",
    "digest", "embedding_digest", "new_run_id", "user_hash",
]
