"""Deleting users completely: adapters, on-demand records, and their rows in every manifest the store keeps.

What "completely" means here, and why each step:
1. A tombstone first (p2p.store.tombstones): from then on no refresh brings the users back, even
   if this deletion dies halfway; running it again finishes the job.
2. Every version of their adapter folders (each `p2p.json` holds the embedding and profile hash)
   and their on-demand records, under every hypernet.
3. Every manifest part under `manifests/` that holds one of their rows, in every run the store
   keeps (committed history, a pending run, strays) is rewritten without those rows, atomically.
   Old manifests are rewritten rather than dropped so that the runs `gc` keeps stay complete
   (a reader on an older `CURRENT` still finds everyone else); compressed Parquet hides ids from
   grep, so the rows must go, not just the folders.
4. Each hypernet whose served manifest lost rows is committed again under a new run id (same
   parts, now without the users): readers compare run ids, so servers reload their index and
   stop finding the users within their recheck interval. Older commit records get their user
   counts corrected in place.
All of it under the store's lease, so no refresh runs across it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from p2p.store import layout
from p2p.store.errors import StoreDamaged
from p2p.store.lease import Lease
from p2p.store.manifest import encode
from p2p.store.runs import Committed, new_run_id
from p2p.userkey import is_user_id


@dataclass
class DeletionReport:
    users: int
    committed_rows_removed: int = 0  # rows gone from the manifests servers read now
    rows_removed: int = 0  # rows gone from every manifest part the store keeps
    parts_rewritten: int = 0
    adapter_objects: int = 0
    on_demand_records: int = 0
    recommitted: dict[str, str] = field(default_factory=dict)  # hypernet -> the run committed without them

    def line(self) -> str:
        return (f"deleted {self.users} user(s): {self.committed_rows_removed} committed row(s) removed "
                f"({self.rows_removed} rows in {self.parts_rewritten} manifest parts across all kept runs), "
                f"{self.adapter_objects} adapter objects and {self.on_demand_records} on-demand records removed; "
                f"tombstoned: a refresh will not bring them back unless given --readmit")


def delete_users(store, user_ids: list[str], lease: Lease) -> DeletionReport:
    """Delete `user_ids` from `store` (an AdapterStore) while holding its `lease`."""
    ids = sorted({u for u in user_ids if is_user_id(u)})
    report = DeletionReport(users=len(ids))
    if not ids:
        return report
    lease.check()
    store.tombstones.add(ids)
    hypernets = store._manifest_hypernets()
    report.adapter_objects = store.objects.delete_prefixes(
        [layout.adapter_prefix(hid, uid) for hid in hypernets for uid in ids])
    for hid in hypernets:
        for uid in ids:
            report.on_demand_records += store.objects.delete(layout.on_demand_record(hid, uid))
    for uid in ids:
        store.histories.delete(uid)  # the history the server kept for events goes with them

    removed = _rewrite_parts(store, ids)
    report.parts_rewritten, report.rows_removed = len(removed), sum(removed.values())
    for hid in hypernets:
        _recommit(store, hid, removed, lease, report)
    store.forget_index()
    return report


def _users(store, record: Committed, removed: dict[str, int]) -> int:
    """The users a record serves now, counted (a user may have rows in several of its layers).

    A record whose parts are not all there any more (gc took an older run's) keeps its count less
    the rows removed: it cannot be served anyway, `recover` skips it.
    """
    try:
        return len(store.manifests.read(record, ["user_id"]))
    except StoreDamaged:
        return record.users - sum(removed.get(p, 0) for p in record.parts)


def _rewrite_parts(store, ids: list[str]) -> dict[str, int]:
    """Rewrite every manifest part holding one of `ids`; part -> rows removed."""
    gone = pa.array(ids, pa.string())
    parts = sorted(rel for rel in store.objects.list("manifests") if layout.run_of_part(rel))

    def rewrite(rel: str) -> int:
        users = store.manifests.read_part(rel, ["user_id"])
        if users is None or not pc.any(pc.is_in(users.column("user_id"), gone)).as_py():
            return 0
        table = store.manifests.read_part(rel)
        kept = table.filter(pc.invert(pc.is_in(table.column("user_id"), gone)))
        store.objects.write(rel, encode(kept))
        return len(table) - len(kept)

    with ThreadPoolExecutor(max_workers=4 if store.objects.local else 16) as pool:
        counts = dict(zip(parts, pool.map(rewrite, parts), strict=True))
    return {rel: n for rel, n in counts.items() if n}


def _recommit(store, hypernet_id: str, removed: dict[str, int], lease: Lease, report: DeletionReport) -> None:
    current = store.runs.current(hypernet_id)
    for record in store.runs.history(hypernet_id):
        if any(p in removed for p in record.parts):
            store.runs.rewrite(Committed(**{**record.__dict__, "users": _users(store, record, removed)}), lease, serve=False)
    if current is None or not any(p in removed for p in current.parts):
        return
    users = _users(store, current, removed)
    default = store.runs.default_hypernet()
    committed = store.runs.commit(hypernet_id, new_run_id(), current.parts, users, lease,
                                  mode=current.mode, make_default=default == hypernet_id)
    report.committed_rows_removed += current.users - users
    report.recommitted[hypernet_id] = committed.run_id
