"""User id -> a storage key that can never address another key.

Everything outside [A-Za-z0-9_-] is percent-encoded, dots included, so `../x`, `a/b`, control
characters and unicode all become flat, distinct, reversible names. Very long ids are cut and
suffixed with a hash so keys stay within object-store limits.

One id has one form: Unicode NFC. `José` typed on macOS arrives decomposed (NFD: `e` + a combining
accent), elsewhere composed, and the two are different bytes, so without one form they would be two
users with two adapters. Ids that come in as a request or an argument are brought to NFC
(`canonical_user_id`); data files must already hold NFC ids, and are refused otherwise
(`p2p.data.schemas`), since quietly renaming a user there would split them from their examples.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from p2p.errors import P2PError

_SAFE = re.compile(r"[A-Za-z0-9_-]")
MAX_KEY = 200


def is_user_id(value: object) -> bool:
    """A user id is a non-empty string (anything else has no key)."""
    return isinstance(value, str) and value != ""


def canonical_user_id(user_id: str) -> str:
    """The id in NFC, the one form the store holds (see the module's docstring)."""
    return unicodedata.normalize("NFC", user_id) if isinstance(user_id, str) else user_id


def user_key(user_id: str) -> str:
    if not is_user_id(user_id):
        raise P2PError(f"invalid user id {user_id!r}: must be a non-empty string")
    key = "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in user_id)
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 17] + "~" + hashlib.sha256(user_id.encode()).hexdigest()[:16]
    return key


def shard_of(user_id: str, shards: int = 256) -> str:
    """A stable two-hex-digit prefix that spreads keys (S3 limits PUTs per prefix)."""
    return f"{hashlib.sha256(user_id.encode()).digest()[0] % shards:02x}"


def check_no_case_collisions(user_ids: list[str], where: str) -> None:
    """Refuse ids whose keys differ only in case (`Alice`, `alice`): one folder on a case-insensitive disk
    (macOS, Windows), where the second would overwrite the first."""
    seen: dict[str, str] = {}
    for uid in user_ids:
        folded = user_key(uid).casefold()
        if folded in seen and seen[folded] != uid:
            raise P2PError(f"{where}: user ids {seen[folded]!r} and {uid!r} differ only in case, so their folders "
                           f"would be one on a case-insensitive disk; fetch or export them to separate folders")
        seen[folded] = uid

