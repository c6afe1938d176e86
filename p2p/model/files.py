"""The file names of the two artifacts the system stores: a hypernet checkpoint and a PEFT adapter folder.

Apart from the code that writes and reads them (p2p/model/hypernet.py, p2p/model/peft_format.py)
so the adapter store can name them without importing a model library, and how a local folder of
them is read (no fsspec: a GPU image with only torch and transformers reads checkpoints too).
"""

import os

from p2p.errors import P2PError

CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS = "config.json", "model.safetensors"
CHECKPOINT_FILES = (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def read_local_files(folder: str, names: tuple[str, ...], what: str) -> dict[str, bytes]:
    """{name: bytes} of the named files of a local folder; a missing one names the folder and what it is not."""
    missing = [name for name in names if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise P2PError(f"{folder}: not {what} (needs {', '.join(names)})")
    out = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out
