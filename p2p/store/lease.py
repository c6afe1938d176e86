"""The store's lease: one run at a time may change manifests (refresh, delete-users, gc, a commit).

Why: without it, a second refresh joined the first one's pending run and wrote the same folders
with other data (a manifest with 137 of 300 digests wrong), and a refresh running across
`delete-users` committed the deleted users back.

How: the holder writes `LEASE` (owner, purpose, token, heartbeat, expiry) and a background thread
renews it every `ttl_s / 4`. Taking and renewing are compare-and-swap (`ObjectStore.create` /
`replace`: conditional PUTs on S3, `flock` locally), so two takers never both win. A taker that
finds an unexpired lease waits up to `wait_s` or raises `LeaseHeld` naming the holder; a holder
that died stops renewing and its lease expires `ttl_s` later. Expiry compares the holder's
clock with the taker's: keep clocks within a few seconds (NTP), far below `ttl_s`.
Before a commit the holder calls `check()`: a holder that stalled past its expiry and was taken
over must not commit (the remaining window between check and write is documented, not closed).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from p2p.store.errors import LeaseHeld, StoreError
from p2p.store.layout import LEASE
from p2p.store.objects import ObjectStore

log = logging.getLogger("p2p.store")


@dataclass
class LeaseRecord:
    owner: str
    purpose: str
    token: str
    acquired_at: float
    heartbeat_at: float
    expires_at: float

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """None for an unreadable record: treated as expired, so garbage never blocks the store."""
        try:
            value = json.loads(data)
            return cls(**{k: value[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return (f"{self.purpose!r} by {self.owner} since {since} (heartbeat {now - self.heartbeat_at:.0f}s ago, "
                f"expires in {max(0.0, self.expires_at - now):.0f}s)")


def owner_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


class Lease:
    def __init__(self, objects: ObjectStore, purpose: str, ttl_s: float = 120.0, wait_s: float = 0.0,
                 heartbeat_s: float | None = None):
        if ttl_s <= 0:
            raise StoreError(f"lease ttl must be positive, got {ttl_s}")
        self.objects, self.purpose, self.ttl_s, self.wait_s = objects, purpose, ttl_s, max(0.0, wait_s)
        self.heartbeat_s = heartbeat_s or ttl_s / 4
        self.record: LeaseRecord | None = None
        self._version: str | None = None
        self._lost: str | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.record is not None and self._lost is None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_take()
            if holder is None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeld(f"store {self.objects.uri} is leased to {holder.describe()}; wait for it "
                                f"(--wait SECONDS), or, if that run is dead, retry once its lease expires")
            time.sleep(min(left, max(0.05, min(1.0, holder.expires_at - time.time()))))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="p2p-lease-heartbeat", daemon=True)
        self._thread.start()
        log.info("took the lease of %s for %r", self.objects.uri, self.purpose)
        return self

    def check(self) -> None:
        """Raise LeaseHeld unless this lease is still ours (renewing it if its expiry is close)."""
        if self.record is None:
            raise LeaseHeld(f"store {self.objects.uri}: no lease held for {self.purpose!r}")
        if self._lost is not None:
            raise LeaseHeld(f"lost the lease of {self.objects.uri}: {self._lost}; nothing committed")
        current = self.objects.read_versioned(LEASE)
        record = LeaseRecord.parse(current[0]) if current else None
        if record is None or record.token != self.record.token:
            self._lost = f"now held by {record.describe()}" if record else "the lease was removed"
            raise LeaseHeld(f"lost the lease of {self.objects.uri}: {self._lost}; nothing committed")
        if record.expires_at - time.time() < self.ttl_s / 2:
            self._renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._guard:
            if self.record is not None and self._lost is None and self._version is not None:
                try:
                    self.objects.delete(LEASE, version=self._version)
                except StoreError as exc:  # it expires on its own; do not hide the original error
                    log.warning("could not release the lease of %s: %s", self.objects.uri, exc)
            self.record, self._version = None, None

    # --- internals ---------------------------------------------------------------------------------

    def _try_take(self) -> LeaseRecord | None:
        """Take the lease if free or expired; otherwise return its (live) holder."""
        now = time.time()
        mine = LeaseRecord(owner_name(), self.purpose, uuid.uuid4().hex, now, now, now + self.ttl_s)
        data = json.dumps(asdict(mine)).encode()
        current = self.objects.read_versioned(LEASE)
        if current is None:
            version = self.objects.create(LEASE, data)
        else:
            held = LeaseRecord.parse(current[0])
            if held is not None and held.expires_at > now:
                return held
            if held is not None:
                log.warning("taking over the expired lease of %s from %s", self.objects.uri, held.describe(now))
            version = self.objects.replace(LEASE, data, current[1])
        if version is None:  # another taker won the race, or our own write landed and its retry was refused
            again = self.objects.read_versioned(LEASE)
            held = LeaseRecord.parse(again[0]) if again else None
            if held is not None and held.token == mine.token:
                version = again[1]  # ours: a client retry of a conditional write that had succeeded
            else:
                return held if held is not None and held.expires_at > time.time() else self._try_take()
        with self._guard:
            self.record, self._version, self._lost = mine, version, None
        return None

    def _renew(self) -> None:
        with self._guard:
            if self.record is None or self._lost is not None:
                return
            now = time.time()
            record = LeaseRecord(**{**asdict(self.record), "heartbeat_at": now, "expires_at": now + self.ttl_s})
            version = self.objects.replace(LEASE, json.dumps(asdict(record)).encode(), self._version)
            if version is None:
                current = self.objects.read_versioned(LEASE)
                other = LeaseRecord.parse(current[0]) if current else None
                if other is not None and other == record:  # our renewal landed; its retry was refused
                    self.record, self._version = record, current[1]
                    return
                self._lost = f"now held by {other.describe()}" if other else "the lease was removed"
                log.error("lost the lease of %s: %s", self.objects.uri, self._lost)
                return
            self.record, self._version = record, version

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._renew()
            except StoreError as exc:  # a blip: the next beat retries; expiry is ttl_s away
                log.warning("lease heartbeat of %s failed: %s", self.objects.uri, exc)
            if self._lost is not None:
                return


def lease_holder(objects: ObjectStore) -> LeaseRecord | None:
    """The current holder, for `p2p store stat` (None when free or expired)."""
    current = objects.read_versioned(LEASE)
    record = LeaseRecord.parse(current[0]) if current else None
    return record if record is not None and record.expires_at > time.time() else None
