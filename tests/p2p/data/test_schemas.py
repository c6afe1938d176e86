import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2p.data.schemas import EXAMPLES, USERS, DataError, read_table, user_ids_from, validate


def users_rows():
    def item(i):
        return {"item_id": f"i{i}", "text": "a film", "label": "noir", "ts": i}

    return [
        {"user_id": "alice", "history": [item(1)], "updated_at": 1},
        {"user_id": "bob", "history": [item(1), item(2)], "updated_at": 2},
    ]


def example_rows():
    return [
        {"example_id": "e1", "user_id": "alice", "task": "tag", "input": "x", "target": "y", "split": "train"},
        {"example_id": "e2", "user_id": "bob", "task": "tag", "input": "x", "target": "y", "split": "val"},
    ]


def test_valid_tables_pass():
    validate(pa.Table.from_pylist(users_rows(), schema=USERS), "users", "u.parquet")
    validate(pa.Table.from_pylist(example_rows(), schema=EXAMPLES), "examples", "e.parquet")


def test_missing_column_names_file_and_column():
    t = pa.Table.from_pylist(users_rows(), schema=USERS).drop_columns(["updated_at"])
    with pytest.raises(DataError, match=r"u\.parquet: missing column 'updated_at'"):
        validate(t, "users", "u.parquet")


def test_wrong_type_names_column():
    t = pa.table({"user_id": ["a"], "history": [[]], "updated_at": ["yesterday"]})
    with pytest.raises(DataError, match=r"u\.parquet: column 'updated_at' has type string"):
        validate(t, "users", "u.parquet")


def test_null_user_id_names_row():
    rows = users_rows()
    rows[1]["user_id"] = None
    t = pa.Table.from_pylist(rows, schema=USERS.set(0, pa.field("user_id", pa.string())))
    with pytest.raises(DataError, match=r"column 'user_id' is null at row 1"):
        validate(t, "users", "u.parquet")


def test_null_history_text_names_user():
    rows = users_rows()
    rows[1]["history"][0]["text"] = None
    item = pa.struct([("item_id", pa.string()), ("text", pa.string()), ("label", pa.string()), ("ts", pa.int64())])
    schema = pa.schema([("user_id", pa.string()), ("history", pa.list_(item)), ("updated_at", pa.int64())])
    with pytest.raises(DataError, match=r"'history.text' is null at row 1 \(user 'bob'\)"):
        validate(pa.Table.from_pylist(rows, schema=schema), "users", "u.parquet")


def test_duplicate_user_id_is_named():
    rows = users_rows()
    rows[1]["user_id"] = "alice"
    with pytest.raises(DataError, match=r"column 'user_id' has duplicate value 'alice'"):
        validate(pa.Table.from_pylist(rows, schema=USERS), "users", "u.parquet")


def test_an_id_not_in_nfc_is_refused_by_row_and_ids_given_as_arguments_are_brought_to_nfc(tmp_path):
    nfd = unicodedata.normalize("NFD", "José")
    for kind, rows, schema in (("users", users_rows(), USERS), ("examples", example_rows(), EXAMPLES)):
        rows[1]["user_id"] = nfd
        with pytest.raises(DataError, match=r"x\.parquet: column 'user_id' at row 1 .* not in Unicode NFC"):
            validate(pa.Table.from_pylist(rows, schema=schema), kind, "x.parquet")
    ids = tmp_path / "ids.txt"
    ids.write_text(nfd + "\n", encoding="utf-8")
    assert user_ids_from(nfd + ",bob", str(ids), "--users") == ["José", "bob", "José"]


def test_user_in_two_splits_is_named(tmp_path):
    rows = example_rows()
    rows[1]["user_id"] = "alice"
    with pytest.raises(DataError, match=r"user 'alice' is in two splits \['train', 'val'\]"):
        validate(pa.Table.from_pylist(rows, schema=EXAMPLES), "examples", "e.parquet")
    # across files of one directory too
    d = tmp_path / "examples"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1], schema=EXAMPLES), d / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{**rows[1], "example_id": "e9"}], schema=EXAMPLES), d / "b.parquet")
    with pytest.raises(DataError, match="two splits"):
        read_table(str(d), "examples")


def test_bad_split_value():
    rows = example_rows()
    rows[0]["split"] = "test"
    with pytest.raises(DataError, match=r"column 'split' has 'test' at row 0 \(user 'alice'\)"):
        validate(pa.Table.from_pylist(rows, schema=EXAMPLES), "examples", "e.parquet")


def test_readers_accept_file_dir_and_uri(tmp_path):
    t = pa.Table.from_pylist(users_rows(), schema=USERS)
    pq.write_table(t, tmp_path / "u.parquet")
    assert read_table(str(tmp_path / "u.parquet"), "users").num_rows == 2
    assert read_table(str(tmp_path), "users").num_rows == 2
    assert read_table(f"file://{tmp_path}", "users").num_rows == 2


def test_reader_names_the_bad_file(tmp_path):
    pq.write_table(pa.Table.from_pylist(users_rows(), schema=USERS), tmp_path / "a.parquet")
    pq.write_table(pa.table({"user_id": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: missing column 'history'"):
        read_table(str(tmp_path), "users")
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(DataError):
        read_table(str(tmp_path / "c.parquet"), "users")
    with pytest.raises(DataError, match="no such file"):
        read_table(str(tmp_path / "missing"), "users")
