"""The store's objects under one root: reads, atomic and conditional writes, listings.

Why a layer of its own:
- A pointer (`CURRENT`, `PENDING`, the lease, an on-demand record) must never be seen half
  written. On S3 one PUT is atomic; on a local or shared filesystem a write goes to a temporary
  name in the same directory and is renamed over the target (`os.replace`), so a reader opens the
  old file or the new one, never a truncated one.
- The lease needs compare-and-swap. S3 has it as conditional PUTs (`If-None-Match: *` to create,
  `If-Match: <ETag>` to replace; AWS S3 since 2024, moto >= 5.0.x, s3fs passes both through).
  Locally the same operations run under an exclusive `flock` on a sidecar `.lock` file, with the
  content's sha256 standing in for the ETag.
- Every failure of the storage itself (network, credentials, a missing bucket) becomes one
  `StoreUnavailable` naming the store, so callers tell it apart from a missing object.
- s3fs creates a missing bucket on `makedirs`; nothing here calls it on S3, and a store whose
  bucket does not exist is an error unless `create=True`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

from fsspec.asyn import sync

from p2p.fs import display, filesystem
from p2p.store.errors import StoreError, StoreUnavailable


class ObjectInfo(NamedTuple):
    size: int
    mtime: float  # seconds since the epoch


def _precondition_failed(exc: BaseException) -> bool:
    """s3fs turns a 412 into OSError(EINVAL) (or FileExistsError for If-None-Match); the cause says which."""
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return isinstance(exc, FileExistsError) or code in ("PreconditionFailed", "412", "ConditionalRequestConflict")


class ObjectStore:
    def __init__(self, uri: str, create: bool = False):
        self.uri = uri
        self.fs, root = filesystem(uri)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = protocol in ("file", "local")
        if not self.local:
            self._check_bucket(create)

    # --- names -------------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str) -> str:
        return display(self.fs, self.path(rel))

    def rel(self, path: str) -> str:
        return path[len(self.root) + 1:] if path.startswith(self.root + "/") else path

    def root_exists(self) -> bool:
        with self._failures("checking the store root"):
            return os.path.isdir(self.root) if self.local else True  # the bucket was checked on open

    # --- reads -------------------------------------------------------------------------------------

    def read(self, rel: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        with self._failures(f"reading {rel}"):
            if self.local:
                with open(self.path(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self.path(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Several objects at once (concurrent GETs on S3); missing ones are left out."""
        if not rels:
            return {}
        if self.local:
            out = {}
            for rel in rels:
                with contextlib.suppress(FileNotFoundError):
                    out[rel] = self.read(rel)
            return out
        with self._failures(f"reading {len(rels)} objects"):
            got = self.fs.cat([self.path(r) for r in rels], on_error="omit")
        return {self.rel(p): data for p, data in got.items() if isinstance(data, bytes)}

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(bytes, version) read together, or None; the version is what `replace` compares against."""
        with self._failures(f"reading {rel}"):
            if self.local:
                try:
                    data = self.read(rel)
                except FileNotFoundError:
                    return None
                return data, hashlib.sha256(data).hexdigest()
            bucket, key = self._bucket_key(rel)

            async def get():
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    return await body.read(), resp["ETag"]

            try:
                return sync(self.fs.loop, get)
            except FileNotFoundError:
                return None

    def exists(self, rel: str) -> bool:
        with self._failures(f"checking {rel}"):
            if self.local:
                return os.path.exists(self.path(rel))
            self.fs.invalidate_cache(self.path(rel))
            return self.fs.exists(self.path(rel))

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        """Every object under `prefix` (one paginated listing on S3), keyed by path relative to the root."""
        path = self.path(prefix)
        with self._failures(f"listing {prefix or '/'}"):
            if self.local:
                if not os.path.isdir(path):
                    return {}
                out = {}
                for d, _, names in os.walk(path):
                    for name in names:
                        st = os.stat(os.path.join(d, name))
                        out[self.rel(os.path.join(d, name))] = ObjectInfo(st.st_size, st.st_mtime)
                return out
            self.fs.invalidate_cache(path)
            found = self.fs.find(path, detail=True)
        return {self.rel(p): ObjectInfo(int(i.get("size") or 0), _mtime(i)) for p, i in found.items()
                if i.get("type") != "directory"}

    # --- writes ------------------------------------------------------------------------------------

    def write(self, rel: str, data: bytes, durable: bool = True) -> str:
        """Replace the object atomically; returns its version."""
        with self._failures(f"writing {rel}"):
            if self.local:
                self._replace_local(self.path(rel), data, durable)
                return hashlib.sha256(data).hexdigest()
            return self._put(rel, data)

    def write_many(self, objects: dict[str, bytes]) -> None:
        """Many objects, each atomic (concurrent PUTs on S3); used for adapter folders and markers."""
        if not objects:
            return
        with self._failures(f"writing {len(objects)} objects"):
            if self.local:
                for rel, data in objects.items():
                    self._replace_local(self.path(rel), data, durable=False)
            else:
                self.fs.pipe({self.path(r): d for r, d in objects.items()})

    def create(self, rel: str, data: bytes) -> str | None:
        """Write only if the object does not exist; its version, or None when it already did."""
        with self._failures(f"creating {rel}"):
            if self.local:
                with self._locked(rel):
                    if os.path.exists(self.path(rel)):
                        return None
                    return self.write(rel, data)
            try:
                return self._put(rel, data, IfNoneMatch="*")
            except OSError as exc:
                if _precondition_failed(exc):
                    return None
                raise

    def replace(self, rel: str, data: bytes, version: str) -> str | None:
        """Write only if the object is still at `version`; its new version, or None when it moved on."""
        with self._failures(f"replacing {rel}"):
            if self.local:
                with self._locked(rel):
                    current = self.read_versioned(rel)
                    if current is None or current[1] != version:
                        return None
                    return self.write(rel, data)
            try:
                return self._put(rel, data, IfMatch=version)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if _precondition_failed(exc):
                    return None
                raise

    def delete(self, rel: str, version: str | None = None) -> bool:
        """Remove one object (only if still at `version`, when given); False when it was not there."""
        with self._failures(f"deleting {rel}"):
            if self.local:
                with self._locked(rel) if version else contextlib.nullcontext():
                    if version is not None:
                        current = self.read_versioned(rel)
                        if current is None or current[1] != version:
                            return False
                    try:
                        os.remove(self.path(rel))
                        return True
                    except FileNotFoundError:
                        return False
            bucket, key = self._bucket_key(rel)
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, **({"IfMatch": version} if version else {}))
            except FileNotFoundError:
                return False
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
            self.fs.invalidate_cache(self.path(rel))
            return True

    def delete_many(self, rels: list[str]) -> None:
        """Remove objects in bulk (S3 batches of 1,000 keys per request)."""
        if not rels:
            return
        with self._failures(f"deleting {len(rels)} objects"):
            if self.local:
                for rel in rels:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path(rel))
                self._prune_empty_dirs({os.path.dirname(self.path(r)) for r in rels})
            else:
                self.fs.rm([self.path(r) for r in rels])
                self.fs.invalidate_cache()

    def delete_prefixes(self, prefixes: list[str]) -> int:
        """Remove everything under each prefix (a folder); returns the number of objects removed."""
        found = [rel for p in prefixes for rel in self.list(p)]
        if self.local:
            for p in prefixes:
                with self._failures(f"deleting {p}"):
                    shutil.rmtree(self.path(p), ignore_errors=True)
        else:
            self.delete_many(found)
        return len(found)

    # --- internals ---------------------------------------------------------------------------------

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    def _put(self, rel: str, data: bytes, **condition) -> str:
        bucket, key = self._bucket_key(rel)
        out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        self.fs.invalidate_cache(self.path(rel))
        return out["ETag"]

    @staticmethod
    def _replace_local(path: str, data: bytes, durable: bool) -> None:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self, rel: str) -> Iterator[None]:
        lock = self.path(rel) + ".lock"
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _prune_empty_dirs(self, folders: set[str]) -> None:
        """Local only: drop folders emptied by a delete, up to the store root."""
        for folder in sorted(folders, key=len, reverse=True):
            while folder.startswith(self.root + "/"):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)

    def _check_bucket(self, create: bool) -> None:
        bucket = self.root.split("/", 1)[0]
        with self._failures(f"checking bucket {bucket!r}"):
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
                return
            except FileNotFoundError:
                if not create:
                    raise StoreUnavailable(f"store {self.uri}: bucket {bucket!r} does not exist (mistyped? "
                                           "pass --create to create it)") from None
            self.fs.call_s3("create_bucket", Bucket=bucket)
            self.fs.invalidate_cache()

    @contextlib.contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, StoreError):
            raise
        except PermissionError as exc:
            raise StoreUnavailable(f"store {self.uri}: access denied {doing}: {exc}") from None
        except Exception as exc:  # network, credentials, endpoint: name the store, keep one line
            raise StoreUnavailable(f"store {self.uri} unavailable {doing}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _mtime(info: dict) -> float:
    value = info.get("LastModified") or info.get("mtime") or 0
    return value.timestamp() if isinstance(value, datetime) else float(value)
