"""What the live-server tests share: a committed store, free ports, and the tokens to expect offline."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable

import numpy as np

from p2p.generation.decoding import decode
from p2p.generation.label_choice import LabelChooser
from p2p.model.adapted import AdaptedModel
from p2p.model.base import load_base_model
from p2p.model.hypernet import load_hypernet
from p2p.personalize import Personalizer, publish_hypernet
from p2p.store import AdapterStore

USERS = [f"user{i}" for i in range(8)]
PROMPT = "Which tag fits this movie: a haunted house at night?"
SERVICE_KEY, ADMIN_KEY = "service-secret", "admin-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_on_a_free_port(serve, deploy: Callable[[], None], tries: int = 3) -> int:
    """Start Ray Serve's proxy on a free port and `deploy` onto it; the port.

    Why a retry: a port `free_port` found free can be taken by another process before the proxy binds
    it (CI saw "Failed to bind to address '127.0.0.1:38399'" in a fixture), and there is no way to hand
    the proxy an already-bound socket."""
    for attempt in range(tries):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            deploy()
            return port
        except RuntimeError as e:
            if "Failed to bind" not in str(e) or attempt == tries - 1:
                raise
            serve.shutdown()
    raise AssertionError("unreachable")


def commit(store: AdapterStore, hypernet_dir: str, users: list[str], seed: int, scale: float = 1.0) -> str:
    """Publish the hypernet and commit one adapter per user (scaled up so adapters visibly move tokens)."""
    hypernet, _ = load_hypernet(hypernet_dir)
    hid = publish_hypernet(store, hypernet_dir)
    run_id = store.begin(hid)
    emb = np.random.default_rng(seed).standard_normal((len(users), 384)).astype(np.float32)
    adapters = [{p: (a * scale, b * scale) for p, (a, b) in ad.items()} for ad in hypernet.user_adapters(emb)]
    items = [(u, Personalizer(hypernet, hid).files(a), f"h{seed}-{u}", e)
             for u, a, e in zip(users, adapters, emb, strict=True)]
    part = store.write_manifest_part(hid, run_id, store.write_adapters(hid, run_id, items), 384)
    store.commit(hid, run_id, [part], len(users))
    return run_id


class Offline:
    """What the server should answer, computed in this process with the same model and adapters."""

    def __init__(self, hypernet_dir: str):
        self.hypernet, _ = load_hypernet(hypernet_dir)
        self.personalizer = Personalizer.from_checkpoint(hypernet_dir)
        model, self.tok = load_base_model("tiny-random")
        self.adapted = AdaptedModel(copy.deepcopy(model), self.tok, self.hypernet.config)

    def ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def tokens(self, prompt: str | list[int], adapter: dict | None, max_tokens: int = 8) -> list[int]:
        ids = self.ids(prompt) if isinstance(prompt, str) else prompt
        return decode(self.adapted, [ids], [max_tokens], [adapter]).tokens[0]

    def chat_ids(self, content: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
        return self.ids(text)

    def label(self, prompt: list[int], labels: list[str], adapter: dict | None) -> str:
        return LabelChooser(self.adapted, labels).choose(prompt, adapter)

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)
