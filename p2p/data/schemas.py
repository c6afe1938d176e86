"""The Arrow schemas of the four tables (docs/design.md, section 3) and their validation.

Every reader goes through `validate`, so bad input fails with the file, the column and the
row or user named, instead of a stack trace from deep inside pyarrow or torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from p2p.errors import P2PError
from p2p.fs import display, filesystem
from p2p.userkey import canonical_user_id


def required(name: str, type_: pa.DataType | None = None) -> pa.Field:
    """A column every row must fill (string unless said otherwise)."""
    return pa.field(name, type_ or pa.string(), nullable=False)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


# Struct children are declared nullable so files written by any tool (pandas, Spark) cast
# cleanly; `validate` enforces that item_id, text and ts are present, naming the user.
HISTORY_ITEM = pa.struct([pa.field("item_id", pa.string()), pa.field("text", pa.string()),
                          pa.field("label", pa.string()), pa.field("ts", pa.int64())])
USERS = pa.schema([required("user_id"), required("history", pa.list_(HISTORY_ITEM)),
                   required("updated_at", pa.int64())])
EXAMPLES = pa.schema([required(name) for name in ("example_id", "user_id", "task", "input", "target", "split")])
SPLITS = ("train", "val", "test_id", "test_ood")
# Per example, what a data set knows beyond its target (the synthetic benchmark writes it):
# the input-only rule's key and answer (null: majority target among training examples of that
# key) and the answer that knows the hidden persona (the ceiling).
REFERENCE = pa.schema([required("example_id"), *(pa.field(name, pa.string()) for name in ("rule_key", "rule", "ceiling"))])


def profiles_schema(dim: int) -> pa.Schema:
    return pa.schema([*(required(name) for name in ("user_id", "profile_text", "profile_hash")),
                      required("embedding", embedding_type(dim)), required("encoder")])


class DataError(P2PError):
    """Input data that breaks a contract; the message names file, column and row/user."""


@dataclass(frozen=True)
class Contract:
    """A kind of table: its schema (given the embedding width, where it has one) and its row checks.

    `unique` columns hold each value once, in a file and across a table's files; `checks` run on
    each file and again on the union (a user in two splits may be split across two files).
    """

    name: str
    schema: Callable[[int], pa.Schema]
    unique: tuple[str, ...] = ()
    checks: tuple[Callable[[pa.Table, str], None], ...] = ()

    def expected(self, table: pa.Table | None = None) -> pa.Schema:
        dim = 0
        if table is not None and "embedding" in table.column_names:
            t = table.schema.field("embedding").type
            dim = t.list_size if pa.types.is_fixed_size_list(t) else 0
        return self.schema(dim)


def _row_name(table: pa.Table, i: int) -> str:
    if "user_id" in table.column_names:
        uid = table.column("user_id")[i].as_py()
        if uid is not None:
            return f"row {i} (user {uid!r})"
    return f"row {i}"


def validate(table: pa.Table, kind: str | Contract, source: str) -> pa.Table:
    """Check `table` against the contract of `kind`; return it cast to the exact schema."""
    contract = contract_of(kind)
    schema = contract.expected(table)
    kind = contract.name
    for field in schema:
        if field.name not in table.column_names:
            raise DataError(
                f"{source}: missing column {field.name!r} ({kind} table; columns found: {table.column_names})"
            )
        got = table.schema.field(field.name).type
        if field.name == "embedding" and not pa.types.is_fixed_size_list(got):
            raise DataError(f"{source}: column 'embedding' must be fixed_size_list<float32>, found {got}")
        if not got.equals(field.type):
            try:
                table = table.set_column(
                    table.column_names.index(field.name), field.name, table.column(field.name).cast(field.type)
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(
                    f"{source}: column {field.name!r} has type {got}, expected {field.type}"
                ) from None
        if not field.nullable:
            col = table.column(field.name)
            if col.null_count:
                i = pc.index(pc.is_null(col), True).as_py()
                raise DataError(f"{source}: column {field.name!r} is null at {_row_name(table, i)}")
    table = table.select(schema.names)
    _check_rows(table, contract, source)
    return table


def _check_rows(table: pa.Table, contract: Contract, source: str) -> None:
    for column in contract.unique:
        _check_unique(table, column, source)
    for check in contract.checks:
        check(table, source)


def _check_history(table: pa.Table, source: str) -> None:
    items = pc.list_flatten(table.column("history"))
    for name in ("item_id", "text", "ts"):
        child = pc.struct_field(items, name)
        if child.null_count:
            j = pc.index(pc.is_null(child), True).as_py()
            parents = pc.list_parent_indices(table.column("history"))
            i = parents[j].as_py()
            raise DataError(f"{source}: column 'history.{name}' is null at {_row_name(table, i)}")


def _check_nfc(table: pa.Table, source: str) -> None:
    """One id, one form (p2p.userkey): an NFD `José` next to an NFC one would be a second user."""
    ids = table.column("user_id")
    bad = pc.fill_null(pc.not_equal(ids, pc.utf8_normalize(ids, form="NFC")), False)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise DataError(f"{source}: column 'user_id' at {_row_name(table, i)} is not in Unicode NFC form, so it "
                        f"would not be the same user as the id a request names; write ids as "
                        f"unicodedata.normalize('NFC', id)")


def _check_unique(table: pa.Table, column: str, source: str) -> None:
    col = table.column(column)
    counts = pc.value_counts(col)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        value = dup[0]["values"].as_py()
        rows = pc.indices_nonzero(pc.equal(col, value)).to_pylist()[:3]
        raise DataError(f"{source}: column {column!r} has duplicate value {value!r} (rows {rows})")


def _check_splits(table: pa.Table, source: str) -> None:
    split = table.column("split")
    bad = pc.invert(pc.is_in(split, value_set=pa.array(SPLITS)))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise DataError(
            f"{source}: column 'split' has {split[i].as_py()!r} at {_row_name(table, i)}; valid: {', '.join(SPLITS)}"
        )
    pairs = table.group_by(["user_id", "split"]).aggregate([]).group_by("user_id").aggregate([("split", "list")])
    many = pc.filter(pairs, pc.greater(pc.list_value_length(pairs.column("split_list")), 1))
    if len(many):
        user = many.column("user_id")[0].as_py()
        splits = sorted(many.column("split_list")[0].as_py())
        raise DataError(f"{source}: column 'split': user {user!r} is in two splits {splits}")


CONTRACTS = {c.name: c for c in (
    Contract("users", lambda dim: USERS, ("user_id",), (_check_nfc, _check_history)),
    Contract("examples", lambda dim: EXAMPLES, ("example_id",), (_check_nfc, _check_splits)),
    Contract("profiles", profiles_schema, ("user_id",), (_check_nfc,)),
    Contract("reference", lambda dim: REFERENCE, ("example_id",)),
)}


def contract_of(kind: str | Contract) -> Contract:
    if isinstance(kind, Contract):
        return kind
    if kind not in CONTRACTS:
        raise ValueError(f"unknown table kind {kind!r}; one of {', '.join(CONTRACTS)}")
    return CONTRACTS[kind]


def parquet_files(uri: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files behind `uri`: a file, a directory, `file://` or `s3://`."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        if not files:
            raise DataError(f"{uri}: no .parquet files in this directory")
        return fs, files
    if not fs.exists(path):
        raise DataError(f"{uri}: no such file or directory")
    return fs, [path]


def _read(reader, fs: fsspec.AbstractFileSystem, path: str, name: str):
    """`pq.read_table` / `pq.read_schema` with a bad file named instead of pyarrow's trace."""
    try:
        return reader(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({exc})") from None


def check_schemas(uri: str, kind: str | Contract) -> list[str]:
    """Check every file's columns and types from its footer alone (no data read); return the files.

    Distributed readers unify schemas across files before any user code runs, so a bad file
    must be caught here, by name, before the job starts. Row-level checks (nulls, duplicates)
    run on each block inside the job.
    """
    fs, files = parquet_files(uri)
    for path in files:
        name = display(fs, path)
        schema = _read(pq.read_schema, fs, path, name)
        expected = contract_of(kind).expected(schema.empty_table())
        for field in expected:
            if field.name in schema.names and not _compatible(schema.field(field.name).type, field.type):
                raise DataError(
                    f"{name}: column {field.name!r} has type {schema.field(field.name).type}, expected {field.type}"
                )
        validate(schema.empty_table(), kind, name)
    return files


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    """Same kind of type (widths and nullability may differ): what `validate` can cast."""
    if got.equals(want):
        return True
    families = (pa.types.is_integer, pa.types.is_floating, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t))
    if any(f(got) and f(want) for f in families):
        return True
    if got.id != want.id:
        return False
    try:
        pa.array([], type=got).cast(want)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False


def iter_tables(uri: str, kind: str | Contract) -> Iterator[tuple[str, pa.Table]]:
    """Yield (file, validated table) one Parquet file at a time: memory stays bounded."""
    fs, files = parquet_files(uri)
    for path in files:
        name = display(fs, path)
        yield name, validate(_read(pq.read_table, fs, path, name), kind, name)


def read_table(uri: str, kind: str | Contract) -> pa.Table:
    """Read and validate a whole table; cross-file contracts are checked on the union."""
    parts = [t for _, t in iter_tables(uri, kind)]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        _check_rows(table, contract_of(kind), uri)
    return table


def write_table(table: pa.Table, uri: str, kind: str | Contract) -> None:
    """Validate, then write one Parquet file (local path or fsspec URI)."""
    table = validate(table, kind, uri)
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def users_uri(data: str) -> str:
    """A data directory's users table (DATA/users), or DATA itself when it is the table."""
    sub = os.path.join(data, "users")
    return sub if os.path.isdir(sub) else data


def examples_uri(data: str) -> str:
    """A data directory's examples table."""
    return os.path.join(data, "examples")


def read_user_id_file(path: str) -> list[str]:
    """User ids, one per line, taken whole (an id may contain commas or spaces); blank lines skipped.

    Raises OSError: each command words the failure for its own option.
    """
    with open(path, encoding="utf-8") as f:
        return [canonical_user_id(line.rstrip("\r\n")) for line in f if line.rstrip("\r\n")]


def user_ids_from(ids: str | None, ids_file: str | None, what: str) -> list[str]:
    """Ids from `--X a,b` and/or `--X-file FILE` (one per line: ids containing commas can be named)."""
    out = [canonical_user_id(u) for u in (ids or "").split(",") if u]
    if ids_file:
        try:
            out += read_user_id_file(ids_file)
        except OSError as exc:
            raise P2PError(f"{what}: cannot read {ids_file}: {exc.strerror}") from None
    return out
