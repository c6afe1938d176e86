"""Whether a model name may reach the Hugging Face Hub: not unless the user says so.

The product promises no network at run time: a name that is not an embedded model, a local
directory or a model already in the local Hugging Face cache fails at once, in one line, instead
of retrying a hub that cannot be reached. `--allow-download` (any `p2p` command) or
`P2P_ALLOW_DOWNLOAD=1` opts in, for clusters that do fetch models.
"""

from __future__ import annotations

import os
import sys

DOWNLOAD_ENV = "P2P_ALLOW_DOWNLOAD"


def downloads_allowed() -> bool:
    """Whether a model name may be fetched from the Hugging Face Hub (off by default: no network at run time)."""
    return os.environ.get(DOWNLOAD_ENV, "") == "1"


def offline_hint() -> str:
    """The end of a 'cannot load' message: what names work offline, and how to opt in to the hub."""
    if downloads_allowed():
        return "a local directory, or a Hugging Face model id"
    return (f"a local directory, or a model in the local Hugging Face cache (to download from the Hub, "
            f"pass --allow-download or set {DOWNLOAD_ENV}=1)")


def enforce() -> None:
    """Before a model loads: unless downloads are allowed, the hub client itself is offline.

    `local_files_only` alone is not enough: huggingface_hub builds its User-Agent from a
    registry it fetches from the hub (even for a local-only lookup), unless HF_HUB_OFFLINE is on.
    It reads that once at import, so a client already imported is switched too.
    """
    if downloads_allowed():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def load_error(exc: Exception, name: str) -> str:
    """Why `name` did not load, in a few words: offline, a missing name is just that, not a failed connection."""
    if not downloads_allowed() and not os.path.isdir(os.path.expanduser(name)):
        return "not installed here (not a local directory, not in the local Hugging Face cache)"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
