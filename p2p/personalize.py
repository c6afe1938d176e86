"""A user's history or embedding -> adapter -> PEFT files: the one place that runs a hypernet for users.

`Personalizer` is a hypernet with its `ProfileEmbedder` (the encoder and the profile settings
the hypernet was trained with). Serving, the nightly refresh, `p2p generate`, store reads of
embeddings-only rows, every evaluated method and the benches make adapters through it, so the
checks live once: the embedder's dimension is the hypernet's, and an embeddings-only row was
made by this hypernet and matches its digest.

`StoredAdapters` reads a store's adapters as PEFT files whatever a row holds: a folder is read
and checked by the store; a row that keeps only the embedding is made into an adapter here, by
the row's own hypernet. The store itself stores rows and files and never runs a model.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np

from p2p.data.schemas import iter_tables, users_uri
from p2p.errors import P2PError
from p2p.model.hypernet import Hypernetwork, checkpoint_files, load_hypernet, load_hypernet_files
from p2p.model.lora import UserAdapter
from p2p.model.peft_format import peft_files, write_peft_folder
from p2p.profile.embedder import ProfileEmbedder
from p2p.progress import ProgressBar
from p2p.store import AdapterStore, StoreDamaged, StoreError
from p2p.store.manifest import check_embedding_rows
from p2p.userkey import user_key


class Personalizer:
    """Histories or embeddings -> per-user adapters (one batched hypernet pass) -> PEFT files.

    The embedder (it loads the encoder) is built on first use: a server or a refresh writer that
    only turns stored embeddings into adapters never loads one.
    """

    def __init__(self, hypernet: Hypernetwork, hypernet_id: str, embedder: ProfileEmbedder | None = None):
        self.hypernet, self.hypernet_id = hypernet, hypernet_id
        self._embedder = self._checked(embedder) if embedder is not None else None
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, folder: str, device: str = "cpu") -> Personalizer:
        return cls(*load_hypernet(folder, device))

    @classmethod
    def from_store(cls, store: AdapterStore, hypernet_id: str, device: str = "cpu") -> Personalizer:
        """The hypernet stored under `hypernet_id`, its content hash checked against that id."""
        hypernet, hid = load_hypernet_files(store.hypernet_files(hypernet_id), f"{store.uri} hypernet {hypernet_id}",
                                            device)
        if hid != hypernet_id:
            raise StoreDamaged(f"hypernet {hypernet_id} in {store.uri} hashes to {hid}: corrupted; publish the "
                               f"checkpoint again (p2p refresh --hypernet FOLDER)")
        return cls(hypernet, hid)

    @property
    def embedder(self) -> ProfileEmbedder:
        with self._lock:
            if self._embedder is None:
                c = self.hypernet.config
                self._embedder = self._checked(ProfileEmbedder(c.encoder, c.profile))
            return self._embedder

    def _checked(self, embedder: ProfileEmbedder) -> ProfileEmbedder:
        dim = self.hypernet.config.embed_dim
        if embedder.dim != dim:
            raise P2PError(f"encoder {embedder.id!r} gives {embedder.dim}-d vectors; hypernet {self.hypernet_id} "
                           f"expects {dim}-d (was it trained with another encoder or profile features?)")
        return embedder

    def adapters(self, histories: list[list[dict]]) -> list[UserAdapter]:
        return self.from_embeddings(self.embedder(histories))

    def from_embeddings(self, embeddings: np.ndarray) -> list[UserAdapter]:
        return self.hypernet.user_adapters(embeddings)

    def shared_adapter(self) -> UserAdapter:
        """The adapter of 'no user' (the training mean): the `shared` control's, and OPPU's start."""
        return self.hypernet.user_adapters(self.hypernet.shared_embedding()[None])[0]

    def files(self, adapter: UserAdapter, dtype: str = "float32") -> dict[str, bytes]:
        """One user's PEFT folder as {file name: bytes}, tagged with the hypernet that made it."""
        return peft_files(adapter, self.hypernet.config, metadata={"hypernet_id": self.hypernet_id}, dtype=dtype)

    def adapters_from_rows(self, rows: list[dict]) -> list[UserAdapter]:
        """Embeddings-only store rows -> adapters in one pass, each row checked (hypernet id, digest) first."""
        if not rows:
            return []
        return self.from_embeddings(check_embedding_rows(rows, self.hypernet_id, self.hypernet.config.embed_dim))

    def files_from_rows(self, rows: list[dict]) -> list[dict[str, bytes]]:
        return [self.files(a) for a in self.adapters_from_rows(rows)]

    def write_folders(self, data: str, out: str, users: list[str] | None = None, batch_size: int = 64) -> int:
        """`p2p generate`: DATA's users -> one PEFT folder each under OUT (escaped ids), in this process.

        The Ray refresh job does the same at scale into a store; this is the readable
        single-machine version, and the oracle the refresh is tested against.
        """
        wanted = set(users) if users is not None else None
        found: set[str] = set()
        written = 0
        with ProgressBar(len(wanted) if wanted is not None else None, "generate", "user") as bar:
            for chunk in _chunks(_histories(data, wanted, found), batch_size):
                for (uid, _), adapter in zip(chunk, self.adapters([h for _, h in chunk]), strict=True):
                    write_peft_folder(self.files(adapter), os.path.join(out, user_key(uid)))
                bar.update(len(chunk))
                written += len(chunk)
        if wanted is not None and wanted - found:
            missing = sorted(wanted - found)
            raise P2PError(f"user(s) not in {users_uri(data)}: {', '.join(map(repr, missing[:10]))}"
                           + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        return written


def _histories(data: str, wanted: set[str] | None, found: set[str]) -> Iterator[tuple[str, list[dict]]]:
    """(user id, history) of DATA's users (only `wanted` ones, when given), file by file."""
    for _, table in iter_tables(users_uri(data), "users"):
        for row in table.to_pylist():
            if wanted is None or row["user_id"] in wanted:
                found.add(row["user_id"])
                yield row["user_id"], row["history"]


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- the store's hypernets and adapters ---------------------------------------------------------


def publish_hypernet(store: AdapterStore, folder: str) -> str:
    """Copy a checkpoint folder into the store, verified first; its hypernet_id."""
    _, hid = load_hypernet(folder)
    store.publish_hypernet(hid, checkpoint_files(folder))
    return hid


def resolve_hypernet(store: AdapterStore, hypernet: str) -> str:
    """A checkpoint folder (published on the way) or the id of a hypernet already stored."""
    if os.path.isdir(hypernet):
        return publish_hypernet(store, hypernet)
    if hypernet and "/" not in hypernet and store.has_hypernet(hypernet):
        return hypernet
    raise StoreError(f"{hypernet!r} is neither a checkpoint folder nor a hypernet in {store.uri} "
                     f"(stored: {', '.join(store.hypernet_ids()) or 'none'})")


class StoredAdapters:
    """A store's adapters as checked PEFT files, whatever each row holds (a folder, or an embedding)."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self._personalizers: dict[str, Personalizer] = {}
        self._lock = threading.Lock()

    def personalizer(self, hypernet_id: str) -> Personalizer:
        """The stored hypernet `hypernet_id`, loaded once."""
        with self._lock:
            if hypernet_id not in self._personalizers:
                self._personalizers[hypernet_id] = Personalizer.from_store(self.store, hypernet_id)
            return self._personalizers[hypernet_id]

    def read(self, user_id: str, hypernet_id: str | None = None) -> tuple[dict[str, bytes], dict]:
        """(PEFT files, manifest or on-demand row) of one user; an embeddings-only row is generated."""
        files, row = self.store.read_adapter(user_id, hypernet_id)
        if files is None:
            [files] = self.personalizer(row["hypernet_id"]).files_from_rows([row])
            row = {k: v for k, v in row.items() if k != "embedding"}
        return files, row

    def fetch(self, user_id: str, local_dir: str, hypernet_id: str | None = None) -> dict:
        """Copy one user's checked PEFT folder to `local_dir` (for `PeftModel.from_pretrained`)."""
        files, row = self.read(user_id, hypernet_id)
        write_peft_folder(files, local_dir)
        return row
