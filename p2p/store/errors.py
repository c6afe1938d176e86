"""What can go wrong with the store, one type per thing a caller does differently.

Callers match on the type, never on message text: a server answers 503 for `StoreUnavailable`,
serves the base model for `AdapterCorrupt`, and 404 for `AdapterNotFound` / `UserDeleted`.
`exit_code` is what `p2p` exits with when the error reaches the command line (jobs/README.md).
"""

from __future__ import annotations

from p2p.errors import P2PError


class StoreError(P2PError):
    """Any store problem; on its own, input the store cannot act on (an unknown hypernet, say)."""

    exit_code = 2


class AdapterNotFound(StoreError):
    """The committed manifest (and the on-demand records) have no adapter for this user."""


class UserDeleted(AdapterNotFound):
    """The user was deleted (tombstoned); nothing of theirs is served or brought back by a refresh."""


class StoreUnavailable(StoreError):
    """The storage itself failed: network, credentials, a bucket or store root that does not exist."""

    exit_code = 4


class LeaseHeld(StoreError):
    """Another run holds the store's lease (or took it over from this one); the message names it."""

    exit_code = 3


class StoreDamaged(StoreError):
    """Committed data that cannot be read as written: the message says how to recover."""

    exit_code = 5


class AdapterCorrupt(StoreDamaged):
    """A committed row whose adapter folder is missing or fails its sha256 (or whose embedding does)."""
