"""Training examples with their user's embedding, and the statistics the hypernet standardizes by.

One join for every path: the local loop, the benches and each Ray Data block of `p2p train`
give an example its user's embedding through `attach_embeddings` (a broadcast lookup of the
profiles; no shuffle).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from p2p.data.schemas import examples_uri, read_table
from p2p.errors import P2PError
from p2p.task.prompt import profile_context


def attach_embeddings(examples: pa.Table, profiles: pa.Table, splits: tuple[str, ...],
                      tasks: list[str] | tuple[str, ...] | None = None) -> pa.Table:
    """The examples of `splits` (and `tasks`), each with its user's `embedding` from `profiles`."""
    mask = pc.is_in(examples.column("split"), value_set=pa.array(list(splits), pa.string()))
    if tasks:
        mask = pc.and_(mask, pc.is_in(examples.column("task"), value_set=pa.array(list(tasks), pa.string())))
    examples = examples.filter(mask)
    index = pc.index_in(examples.column("user_id"), value_set=profiles.column("user_id"))
    if index.null_count:
        missing = examples.column("user_id").filter(pc.is_null(index))[0].as_py()
        raise P2PError(f"examples: user {missing!r} has no profile (rebuild profiles with `p2p profiles`)")
    out = examples.append_column("embedding", profiles.column("embedding").take(index))
    if "profile_text" in profiles.column_names:  # the retrieval control reads it in its prompt
        out = out.append_column("profile_text", profiles.column("profile_text").take(index))
    return out


def example_rows(data: str, profiles: pa.Table, splits: tuple[str, ...],
                 tasks: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """The examples of DATA in `splits` (and `tasks`) as rows, each carrying its user's embedding."""
    return attach_embeddings(read_table(examples_uri(data), "examples"), profiles, splits, tasks).to_pylist()


def embedding_stats(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over users (one row each): what the hypernet standardizes inputs by."""
    embeddings = np.asarray(embeddings, np.float32)
    return embeddings.mean(0), embeddings.std(0)


def user_embeddings(rows: list[dict]) -> np.ndarray:
    """Each user of `rows` once: their embedding, in first-seen order."""
    users = {r["user_id"]: np.asarray(r["embedding"], np.float32) for r in rows}
    return np.stack(list(users.values()))


def as_control(rows: list[dict], control: str, mean: np.ndarray) -> list[dict]:
    """A control's data: every example carries the same embedding (no user signal through the hypernet).

    `shared`: that is all. `retrieval`: the example's prompt also holds its user's profile text
    (summary + top-k history items) as a system message: what a team would build instead of P2P.
    """
    if control == "none":
        return rows
    if control == "retrieval":
        return [{**r, "embedding": mean, "system": profile_context(r["profile_text"])} for r in rows]
    return [{**r, "embedding": mean} for r in rows]
