"""The commit protocol: which run each hypernet serves (`CURRENT`), which run is being written (`PENDING`).

    begin   -> a new run id, recorded in PENDING with the dead runs it may reuse rows from
    commit  -> every part exists; stray parts of the run go; commit record; CURRENT (last); PENDING goes
    abandon -> a run with nothing to commit: its parts and PENDING go
    current -> what readers serve

Why these choices:
- A run id belongs to one driver. A rerun after a crash starts a new run and reuses the rows the
  dead run finished (its manifest parts list them, each written after its block's folders), so
  workers a dead driver left behind can never write into the run that gets committed.
- `CURRENT` is written last, atomically (`ObjectStore.write`), and lists its part files: stray
  parts are never read. It is a copy of the run's commit record (`commits/<run_id>.json`), so an
  unreadable `CURRENT` can be rebuilt from the records (`recover`).
- Readers retry a pointer that vanished or reads as garbage for a moment (a store without
  atomic renames, or an eventually consistent one); an unreadable pointer after that is
  `StoreDamaged` naming the command that repairs it.
- Commit, abandon and recover need the store's lease (`p2p.store.lease`), checked right before
  `CURRENT` is written.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field

from p2p.store import layout
from p2p.store.errors import StoreDamaged, StoreError, StoreUnavailable
from p2p.store.lease import Lease
from p2p.store.objects import ObjectStore

MODES = ("adapters", "embeddings")


def new_run_id() -> str:
    """Sortable by time, unique across concurrent writers."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass
class Committed:
    """A commit record: the run whose manifest readers serve."""

    hypernet_id: str
    run_id: str
    parts: list[str]
    users: int
    created_at: float
    mode: str = "adapters"  # what new rows of the run carry: adapter folders, or embeddings only

    @classmethod
    def from_json(cls, data: bytes) -> Committed:
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def layers(self) -> list[list[str]]:
        """The parts grouped by the run that wrote them, oldest first: a night adds a layer (p2p.store.manifest)."""
        return layers_of(self.parts)


def layers_of(parts: list[str]) -> list[list[str]]:
    """`parts` in runs of consecutive parts written by one run (`layout.run_of_part`)."""
    out: list[list[str]] = []
    for rel in parts:
        if out and layout.run_of_part(out[-1][-1]) == layout.run_of_part(rel):
            out[-1].append(rel)
        else:
            out.append([rel])
    return out


@dataclass
class Pending:
    """The run being written, and the dead runs before it whose finished rows it may reuse."""

    run_id: str
    owner: str
    started_at: float
    resume_from: list[str] = field(default_factory=list)


class RunLog:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self._seen: set[str] = set()  # pointers this reader has read: their absence is a blip, retried

    # --- reading -----------------------------------------------------------------------------------

    def current(self, hypernet_id: str | None = None) -> Committed | None:
        """The committed run of `hypernet_id` (default: the hypernet committed last), or None."""
        if hypernet_id is None:
            hypernet_id = self.default_hypernet()
            if hypernet_id is None:
                return None
        data = self._pointer(layout.current(hypernet_id))
        if data is None:
            return None
        try:
            return Committed.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._damaged(layout.current(hypernet_id), data, exc, hypernet_id) from None

    def default_hypernet(self) -> str | None:
        data = self._pointer(layout.DEFAULT_CURRENT)
        if data is None:
            return None
        try:
            return str(json.loads(data)["hypernet_id"])
        except (ValueError, TypeError, KeyError) as exc:
            raise self._damaged(layout.DEFAULT_CURRENT, data, exc, None) from None

    def commit_record(self, hypernet_id: str, run_id: str) -> Committed | None:
        """The run's commit record, or None if it never committed (or the record is torn)."""
        try:
            return Committed.from_json(self.objects.read(layout.commit_record(hypernet_id, run_id)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return None

    def pending(self, hypernet_id: str) -> Pending | None:
        try:
            data = self.objects.read(layout.pending(hypernet_id))
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
            return Pending(**{k: value[k] for k in Pending.__dataclass_fields__ if k in value})
        except (ValueError, TypeError) as exc:
            raise StoreDamaged(f"{self.objects.url(layout.pending(hypernet_id))} is unreadable ({exc}); "
                               f"delete it (the next refresh starts afresh)") from None

    def history(self, hypernet_id: str) -> list[Committed]:
        """Every commit record of the hypernet, newest first."""
        rels = sorted(r for r in self.objects.list(f"{layout.manifests_root(hypernet_id)}/commits") if r.endswith(".json"))
        records = []
        for data in self.objects.read_many(rels).values():
            try:
                records.append(Committed.from_json(data))
            except (ValueError, TypeError, KeyError):
                continue  # a torn record of a commit that never wrote CURRENT
        return sorted(records, key=lambda c: (c.created_at, c.run_id), reverse=True)

    def run_parts(self, hypernet_id: str, run_ids: list[str]) -> list[str]:
        """Every part file written under these runs (for a resume: rows their blocks finished)."""
        return sorted(rel for run_id in run_ids for rel in self.objects.list(layout.run_dir(hypernet_id, run_id))
                      if rel.endswith(".parquet"))

    # --- writing -----------------------------------------------------------------------------------

    def begin(self, hypernet_id: str, lease: Lease) -> Pending:
        """A new run id; a dead run's PENDING becomes a run this one resumes from."""
        lease.check()
        dead = self.pending(hypernet_id)
        resume = [*dead.resume_from, dead.run_id] if dead is not None else []
        run = Pending(new_run_id(), lease.record.owner, time.time(), resume)
        self.objects.write(layout.pending(hypernet_id), json.dumps(asdict(run)).encode())
        return run

    def commit(self, hypernet_id: str, run_id: str, parts: list[str], users: int, lease: Lease,
               mode: str = "adapters", make_default: bool = True) -> Committed:
        """Make a run the one readers serve; see the module docstring for the order."""
        if mode not in MODES:
            raise StoreError(f"unknown store mode {mode!r}; one of {', '.join(MODES)}")
        self._check_parts(hypernet_id, run_id, parts)
        committed = Committed(hypernet_id, run_id, _in_layer_order(parts), users, time.time(), mode)
        lease.check()  # before the record too: a run that lost its lease leaves none for gc to keep or recover to promote
        self.objects.write(layout.commit_record(hypernet_id, run_id), committed.to_json())
        lease.check()
        self.objects.write(layout.current(hypernet_id), committed.to_json())
        if make_default:
            self.objects.write(layout.DEFAULT_CURRENT, json.dumps({"hypernet_id": hypernet_id, "run_id": run_id}).encode())
        self._drop_pending(hypernet_id, run_id)
        return committed

    def abandon(self, hypernet_id: str, run_id: str, lease: Lease) -> None:
        """Forget a run that had nothing to commit: its staged parts and the PENDING record."""
        lease.check()
        staged = list(self.objects.list(layout.run_dir(hypernet_id, run_id)))
        self.objects.delete_many(staged)
        self._drop_pending(hypernet_id, run_id)

    def rewrite(self, committed: Committed, lease: Lease, serve: bool) -> None:
        """Replace a commit record in place (a deletion's corrected user count); `serve`: also CURRENT."""
        lease.check()
        self.objects.write(layout.commit_record(committed.hypernet_id, committed.run_id), committed.to_json())
        if serve:
            self.objects.write(layout.current(committed.hypernet_id), committed.to_json())

    def recover(self, hypernet_id: str, lease: Lease) -> Committed:
        """Point an unreadable CURRENT at the newest commit record whose parts all exist."""
        for committed in self.history(hypernet_id):
            try:
                self._check_parts(hypernet_id, committed.run_id, committed.parts, drop_strays=False)
            except StoreError:
                continue
            lease.check()
            self.objects.write(layout.current(hypernet_id), committed.to_json())
            try:
                self.default_hypernet()
            except StoreDamaged:
                self.objects.write(layout.DEFAULT_CURRENT,
                                   json.dumps({"hypernet_id": hypernet_id, "run_id": committed.run_id}).encode())
            return committed
        raise StoreDamaged(f"{self.objects.uri}: hypernet {hypernet_id} has no complete commit record to recover "
                           f"from; run `p2p refresh --full` to rebuild its manifest")

    # --- internals ---------------------------------------------------------------------------------

    def _check_parts(self, hypernet_id: str, run_id: str, parts: list[str], drop_strays: bool = True) -> None:
        """Every listed part exists (one listing per folder); unlisted parts in the run's own folder go."""
        listed: dict[str, set[str]] = {}
        for rel in parts:
            folder = rel.rsplit("/", 1)[0]
            if folder not in listed:
                listed[folder] = set(self.objects.list(folder))
            if rel not in listed[folder]:
                raise StoreError(f"cannot commit run {run_id}: part {rel} is missing from {self.objects.uri}")
        if drop_strays:
            own = layout.run_dir(hypernet_id, run_id)
            present = listed[own] if own in listed else set(self.objects.list(own))
            self.objects.delete_many(sorted(present - set(parts)))

    def _drop_pending(self, hypernet_id: str, run_id: str) -> None:
        pending = self.pending(hypernet_id)
        if pending is not None and pending.run_id == run_id:
            self.objects.delete(layout.pending(hypernet_id))

    def _pointer(self, rel: str, attempts: int = 5) -> bytes | None:
        """A pointer's bytes; a pointer seen before that vanishes or reads as garbage is retried briefly.

        One seen before that stays gone is `StoreUnavailable`, not "nothing committed": no operation
        deletes a pointer, so a store whose pointer went away was moved, unmounted or cut off, and
        its users must get a 503 to retry rather than the base model as if they had no adapter.
        """
        for attempt in range(attempts):
            try:
                data = self.objects.read(rel)
            except FileNotFoundError:
                if rel not in self._seen:
                    return None
                data = None
            if data:
                try:
                    json.loads(data)
                    self._seen.add(rel)
                    return data
                except ValueError:
                    pass
            if attempt < attempts - 1:
                time.sleep(0.05 * (attempt + 1))
        if data is None:
            raise StoreUnavailable(f"{self.objects.url(rel)} was there and is gone: the store was moved, unmounted "
                                   f"or cut off (no command deletes it); `p2p store recover` repairs a store whose "
                                   f"commit records remain")
        return data  # unreadable: the caller names it (StoreDamaged)

    def _damaged(self, rel: str, data: bytes, exc: BaseException, hypernet_id: str | None) -> StoreDamaged:
        why = "empty" if not data.strip() else f"{type(exc).__name__}: {exc}"
        target = f" --hypernet-id {hypernet_id}" if hypernet_id else ""
        return StoreDamaged(f"{self.objects.url(rel)} is unreadable ({why}): a crash while writing it, or a "
                            f"damaged copy; run `p2p store recover --store {self.objects.uri}{target}` to point it at "
                            f"the newest complete commit")


def _in_layer_order(parts: list[str]) -> list[str]:
    """Runs in the order given (older layers first: the last one holding a user wins), parts sorted within
    each, each part once."""
    order: dict[str | None, int] = {}
    for rel in parts:
        order.setdefault(layout.run_of_part(rel), len(order))
    return sorted(set(parts), key=lambda rel: (order[layout.run_of_part(rel)], rel))
