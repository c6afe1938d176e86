"""Where everything lives under a store root: the one place that spells the keys.

    LEASE                                           who may change manifests now (p2p.store.lease)
    hypernets/<hid>/{config.json, model.safetensors}
    adapters/<hid>/<shard>/<user key>/<run_id>/{adapter_config.json, adapter_model.safetensors, p2p.json}
    manifests/<hid>/<run_id>.parquet/part-*.parquet   one row per user (manifest schema)
    manifests/<hid>/commits/<run_id>.json             one record per commit, never rewritten but by deletion
    manifests/<hid>/CURRENT                           the committed run: a copy of its commit record
    manifests/<hid>/PENDING                           the run being written, and the dead runs it resumes
    manifests/CURRENT                                 the hypernet committed most recently
    ondemand/<hid>/<shard>/<user key>.json            adapters made by a server for users it met first
    tombstones/<time>-<id>.parquet                    sha256 of deleted users' ids (p2p.store.tombstones)

User ids become keys through `p2p.userkey` (no `/`, `..` or control characters reach a key); the
two-hex-digit shard spreads keys, since S3 limits request rates per prefix.
"""

from __future__ import annotations

from p2p.model.files import CHECKPOINT_FILES
from p2p.userkey import shard_of, user_key

LEASE = "LEASE"
DEFAULT_CURRENT = "manifests/CURRENT"
TOMBSTONES = "tombstones"
MARKER = "p2p.json"
HYPERNET_FILES = CHECKPOINT_FILES  # a hypernet is stored as its checkpoint folder


def hypernet_file(hypernet_id: str, name: str) -> str:
    return f"hypernets/{hypernet_id}/{name}"


def adapters_root(hypernet_id: str) -> str:
    return f"adapters/{hypernet_id}"


def adapter_prefix(hypernet_id: str, user_id: str) -> str:
    """Every version of one user's adapter under one hypernet."""
    return f"adapters/{hypernet_id}/{shard_of(user_id)}/{user_key(user_id)}"


def adapter_dir(hypernet_id: str, user_id: str, run_id: str) -> str:
    return f"{adapter_prefix(hypernet_id, user_id)}/{run_id}"


def adapter_folder_of(rel: str) -> str | None:
    """The folder (adapters/<hid>/<shard>/<key>/<run_id>) an object under adapters/ belongs to."""
    parts = rel.split("/")
    return "/".join(parts[:5]) if len(parts) >= 6 and parts[0] == "adapters" else None


def manifests_root(hypernet_id: str) -> str:
    return f"manifests/{hypernet_id}"


def run_dir(hypernet_id: str, run_id: str) -> str:
    return f"manifests/{hypernet_id}/{run_id}.parquet"


def run_of_part(rel: str) -> str | None:
    """The run id a manifest part belongs to (manifests/<hid>/<run_id>.parquet/part-*.parquet)."""
    parts = rel.split("/")
    if len(parts) == 4 and parts[0] == "manifests" and parts[2].endswith(".parquet"):
        return parts[2][: -len(".parquet")]
    return None


def commit_record(hypernet_id: str, run_id: str) -> str:
    return f"manifests/{hypernet_id}/commits/{run_id}.json"


def current(hypernet_id: str) -> str:
    return f"manifests/{hypernet_id}/CURRENT"


def pending(hypernet_id: str) -> str:
    return f"manifests/{hypernet_id}/PENDING"


HISTORIES = "histories"


def history_record(user_id: str) -> str:
    return f"{HISTORIES}/{shard_of(user_id)}/{user_key(user_id)}.json"


def on_demand_root(hypernet_id: str) -> str:
    return f"ondemand/{hypernet_id}"


def on_demand_record(hypernet_id: str, user_id: str) -> str:
    return f"ondemand/{hypernet_id}/{shard_of(user_id)}/{user_key(user_id)}.json"
