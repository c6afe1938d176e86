"""`p2p store gc`: remove what no kept run points at.

Kept, per hypernet:
- the newest `keep_runs` commits, `CURRENT`'s among them, and any run replaced less than
  `grace_s` ago (a server may still read through the `CURRENT` it fetched before the switch);
- the pending run and the dead runs it resumes (a rerun reuses their rows);
- the folders of on-demand records not superseded by a committed row.
Everything else is garbage: adapter folders no kept row names (old versions, dead runs, on-demand
orphans), manifest parts of runs not kept and stray parts of kept runs, commit records of runs not
kept, superseded on-demand records, temporary files of crashed writers. An unreferenced object
younger than `grace_s` stays (a writer that is not under the lease, a server storing an
on-demand adapter, may be about to point at it).

Cost: one listing of `manifests/<hid>/`, `ondemand/<hid>/` and `adapters/<hid>/` per hypernet,
the `adapter_uri` column of the kept parts, and bulk deletes (1,000 keys a request on S3).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from p2p.store import layout
from p2p.store.lease import Lease
from p2p.store.manifest import ManifestIndex
from p2p.store.objects import ObjectInfo
from p2p.store.runs import Committed


@dataclass
class GcReport:
    objects: int = 0
    bytes: int = 0
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> {"objects", "bytes"}
    kept_runs: dict[str, list[str]] = field(default_factory=dict)  # hypernet -> run ids kept
    dry_run: bool = False

    def line(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        kinds = ", ".join(f"{k} {v['objects']} ({v['bytes']:,} B)" for k, v in sorted(self.kinds.items()))
        kept = "; ".join(f"{h}: {len(r)} run(s) kept" for h, r in self.kept_runs.items())
        return f"gc {verb} {self.objects} objects, {self.bytes:,} bytes [{kinds or 'nothing'}]; {kept or 'no runs'}"


def collect_garbage(store, lease: Lease, keep_runs: int = 2, grace_s: float = 3600.0,
                    dry_run: bool = False) -> GcReport:
    """Delete the store's garbage (see the module docstring) while holding its `lease`."""
    if keep_runs < 1:
        raise ValueError(f"keep_runs must be >= 1, got {keep_runs}")
    now, report = time.time(), GcReport(dry_run=dry_run)
    doomed: dict[str, tuple[str, ObjectInfo]] = {}
    seen: dict[str, ObjectInfo] = {}  # every object listed, for temporary files of crashed writers
    for hid in store._manifest_hypernets():
        kept = _kept_runs(store, hid, keep_runs, grace_s, now)
        report.kept_runs[hid] = [c.run_id for c in kept]
        live_parts, listing = _live_parts(store, hid, kept)
        for rel, info in listing.items():
            kind = _manifest_garbage(rel, live_parts, {c.run_id for c in kept})
            if kind:
                doomed[rel] = (kind, info)
        live_folders = _live_folders(store, hid, kept, live_parts)
        live_folders |= _on_demand(store, hid, kept, doomed)
        folders: dict[str, dict[str, ObjectInfo]] = defaultdict(dict)
        adapters = store.objects.list(layout.adapters_root(hid))
        for rel, info in adapters.items():
            folders[layout.adapter_folder_of(rel) or rel][rel] = info
        for folder, objects in folders.items():
            if folder not in live_folders:
                doomed.update({rel: ("adapter folders", info) for rel, info in objects.items()})
        seen.update(listing)
        seen.update(adapters)
        seen.update(store.objects.list(layout.on_demand_root(hid)))
    seen.update(store.objects.list(layout.TOMBSTONES))
    seen.update(_pointer_folders(store))
    doomed.update({rel: ("temporary files", info) for rel, info in seen.items() if _temporary(rel)})

    deletable = sorted(rel for rel, (_, info) in doomed.items() if info.mtime <= now - grace_s)
    for rel in deletable:
        kind, info = doomed[rel]
        entry = report.kinds.setdefault(kind, {"objects": 0, "bytes": 0})
        entry["objects"] += 1
        entry["bytes"] += info.size
        report.objects += 1
        report.bytes += info.size
    if not dry_run:
        lease.check()
        store.objects.delete_many(deletable)
        store._index = None
    return report


def _kept_runs(store, hid: str, keep_runs: int, grace_s: float, now: float) -> list[Committed]:
    history = store.runs.history(hid)  # newest first
    current = store.runs.current(hid)
    kept = history[:keep_runs]
    for newer, older in zip(history, history[1:], strict=False):
        if newer.created_at > now - grace_s and older not in kept:
            kept.append(older)  # replaced within the grace period: readers may still use it
    if current is not None and current.run_id not in {c.run_id for c in kept}:
        kept.insert(0, current)
    return kept


def _live_parts(store, hid: str, kept: list[Committed]) -> tuple[set[str], dict[str, ObjectInfo]]:
    listing = {rel: info for rel, info in store.objects.list(layout.manifests_root(hid)).items()
               if not rel.endswith(".lock")}
    live = {p for c in kept for p in c.parts}
    pending = store.runs.pending(hid)
    if pending is not None:
        resumable = {pending.run_id, *pending.resume_from}
        live |= {rel for rel in listing if layout.run_of_part(rel) in resumable}
    return live, listing


def _live_folders(store, hid: str, kept: list[Committed], live_parts: set[str]) -> set[str]:
    """Folders a kept run's rows name (each run's own rows: a row a newer layer replaced is not live),
    and those in the pending and dead runs' parts, which a rerun may reuse."""
    folders = set()
    for committed in kept:
        folders |= {uri for uri in store.manifests.read(committed, ["adapter_uri"]).column("adapter_uri").to_pylist() if uri}
    in_kept = {p for c in kept for p in c.parts}
    for table in store.manifests.read_parts(sorted(live_parts - in_kept), ["adapter_uri"]):
        folders |= {uri for uri in table.column("adapter_uri").to_pylist() if uri}
    return folders


def _manifest_garbage(rel: str, live_parts: set[str], kept_runs: set[str]) -> str | None:
    name = rel.rsplit("/", 1)[-1]
    if name in ("CURRENT", "PENDING") or _temporary(rel):
        return None  # pointers stay; temporary files are collected store-wide
    if layout.run_of_part(rel) is not None:
        return None if rel in live_parts else "manifest parts"
    if "/commits/" in rel and name.endswith(".json"):
        return None if name[: -len(".json")] in kept_runs else "commit records"
    return None


def _temporary(rel: str) -> bool:
    """A local writer's temporary file (ObjectStore writes `.NAME.RANDOM.tmp`, then renames it)."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".tmp")


def _pointer_folders(store) -> dict[str, ObjectInfo]:
    """Objects directly in the root and in manifests/ (the lease, the default CURRENT), local stores only."""
    if not store.objects.local:
        return {}
    out = {}
    for folder in ("", "manifests"):
        path = store.objects.path(folder)
        if os.path.isdir(path):
            for name in os.listdir(path):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    st = os.stat(full)
                    out[store.objects.rel(full)] = ObjectInfo(st.st_size, st.st_mtime)
    return out


def _on_demand(store, hid: str, kept: list[Committed], doomed: dict) -> set[str]:
    """Folders of live on-demand records; records a committed row superseded join `doomed`."""
    listing = {rel: info for rel, info in store.objects.list(layout.on_demand_root(hid)).items()
               if rel.endswith(".json") and not rel.rsplit("/", 1)[-1].startswith(".")}
    if not listing:
        return set()
    current = store.runs.current(hid)
    index = ManifestIndex(store.manifests, current) if current is not None else None
    live = set()
    for rel, data in store.objects.read_many(sorted(listing)).items():
        try:
            record = json.loads(data)
        except ValueError:
            doomed[rel] = ("on-demand records", listing[rel])
            continue
        committed = index.row(record["user_id"]) if index is not None else None
        if committed is not None and committed["created_at"] >= record["created_at"]:
            doomed[rel] = ("on-demand records", listing[rel])
        elif record.get("adapter_uri"):
            live.add(record["adapter_uri"])
    return live
