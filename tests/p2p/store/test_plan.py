"""The refresh's plan, one partition at a time (no Ray): layers, dead runs, tombstones, guards; and layered reads."""

import pyarrow as pa

from p2p.store.manifest import REMOVED, removal_rows, resolve
from p2p.store.plan import PlanShape, check_partition, plan_partition
from p2p.store.tombstones import user_hash

DIM = 2


def _stored(rows: list[tuple], layer: int, shape: PlanShape) -> pa.Table:
    """rows: (user_id, profile_hash, sha256, has_folder)."""
    part = pa.table({"user_id": [r[0] for r in rows], "profile_hash": [r[1] for r in rows],
                     "sha256": [r[2] for r in rows], "adapter_uri": [f"a/{r[0]}" if r[3] else None for r in rows],
                     "bytes": [0] * len(rows), "created_at": [1] * len(rows),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * DIM * len(rows), pa.float32()), DIM)})
    return shape.stored_rows(part, layer)


def _input(ids: list[str], hashes: list[str], shape: PlanShape) -> pa.Table:
    return shape.input_rows(pa.table({"user_id": ids, "profile_hash": hashes, "t_profile": [0.1] * len(ids)}))


def _decisions(out: pa.Table) -> dict:
    return {r["user_id"]: r["status"] for r in out.to_pylist() if r["user_id"] is not None}


def test_each_user_is_decided_from_the_newest_layer_and_unchanged_users_become_a_count():
    shape = PlanShape(DIM, carry=True, profiles=True)
    committed = [_stored([("same", "h1", "d1", False), ("changed", "h1", "d1", False), ("gone", "h1", "d1", False),
                          ("layered", "old", "d1", False), ("readded", "h1", "d1", False)], 0, shape),
                 _stored([("layered", "h2", "d2", False), ("readded", REMOVED, REMOVED, False)], 1, shape)]
    dead = _stored([("resumed", "h3", "d3", False), ("conflict", "h4", "d4", False), ("conflict", "h4", "d5", False),
                    ("twice", "h6", "d6", False), ("twice", REMOVED, REMOVED, False)], 2, shape)
    tomb = shape.tombstone_rows(pa.table({"user_sha256": [user_hash("deleted")]}))
    tonight = _input(["same", "changed", "layered", "readded", "resumed", "conflict", "deleted", "new"],
                     ["h1", "hX", "h2", "h1", "h3", "h4", "h1", "h9"], shape)
    rows = pa.concat_tables([tonight, *committed, dead, tomb])

    out = plan_partition(rows, "embeddings", committed_layers=2, full=False, compact=False)
    # "same" and "layered" (its newest layer has tonight's hash) stay as they are: counted, not carried
    # "twice": a retried block kept and removed the user; absent tonight, a removal row settles it
    assert _decisions(out) == {"changed": "embed", "readded": "embed", "resumed": "resumed", "conflict": "embed",
                               "deleted": "deleted", "new": "embed", "gone": "removed", "twice": "removed"}
    [count] = [r for r in out.to_pylist() if r["user_id"] is None]
    assert (count["status"], count["n"]) == ("unchanged", 2)
    by_user = {r["user_id"]: r for r in out.to_pylist()}
    assert by_user["changed"]["prev_sha256"] == "d1"  # kept if the new row fails
    assert by_user["conflict"]["prev_sha256"] is None  # its retried rows disagree: nothing to fall back on

    compacted = plan_partition(rows, "embeddings", committed_layers=2, full=False, compact=True)
    assert _decisions(compacted)["same"] == "unchanged" and _decisions(compacted)["layered"] == "unchanged"
    assert [r["prev_profile_hash"] for r in compacted.to_pylist() if r["user_id"] == "layered"] == ["h2"]

    adapters = _decisions(plan_partition(rows, "adapters", committed_layers=2, full=False, compact=False))
    assert adapters["same"] == adapters["layered"] == "regenerate"  # rows without folders, same profiles
    full = _decisions(plan_partition(rows, "embeddings", committed_layers=2, full=True, compact=True))
    assert full["same"] == full["resumed"] == "embed"


def test_the_guards_count_per_partition_and_name_a_duplicate():
    shape = PlanShape(DIM, carry=False, profiles=False)
    committed = [_stored([("a", "h", "d", False), ("b", "h", "d", False), ("c", "h", "d", False)], 0, shape),
                 _stored([("c", REMOVED, REMOVED, False)], 1, shape)]
    dead = _stored([("z", "h", "d", False)], 2, shape)
    ids = shape.input_rows(pa.table({"user_id": ["a", "a", "x", None], "path": ["f1", "f2", "f1", "f2"]}))
    [row] = check_partition(pa.concat_tables([ids, *committed, dead]), committed_layers=2).to_pylist()
    assert row == {"inputs": 3, "duplicated": 1, "example": ["a", "f1", "f2"], "committed": 2, "removed": 1}


def test_reading_layers_keeps_the_newest_row_and_drops_removed_users():
    def part(rows):
        return pa.Table.from_pylist(rows)

    older = part([{"user_id": u, "sha256": f"{u}1", "embedding": [0.0, 0.0]} for u in ("a", "b", "c")])
    newer = pa.Table.from_pylist([{"user_id": "a", "sha256": "a2", "embedding": [1.0, 1.0]}] + [
        {k: r[k] for k in ("user_id", "sha256", "embedding")} for r in removal_rows(["b"], "h", 2, 0)])
    table = resolve(pa.concat_tables([older, newer.cast(older.schema)]))
    assert sorted(zip(table.column("user_id").to_pylist(), table.column("sha256").to_pylist(), strict=True)) == [
        ("a", "a2"), ("c", "c1")]


def test_layer_order_keeps_runs_as_given_and_each_part_once():
    from p2p.store.runs import _in_layer_order, layers_of

    def part(run, name):
        return f"manifests/h/{run}.parquet/part-{name}.parquet"

    # a run that committed but whose PENDING outlived it must not appear twice, nor move above a later run
    given = [part("b", "2"), part("b", "1"), part("a", "9"), part("b", "1"), part("c", "0")]
    ordered = _in_layer_order(given)
    assert ordered == [part("b", "1"), part("b", "2"), part("a", "9"), part("c", "0")]
    assert [len(layer) for layer in layers_of(ordered)] == [2, 1, 1]
