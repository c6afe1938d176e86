"""How a profile is built from a history: one set of settings for training, refresh and serving.

A hypernet records the settings it was trained with (`HypernetConfig.profile`), so every later
profile of its users is built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProfileConfig:
    top_k: int = 8  # history items quoted after the summary
    max_chars: int = 900  # hard bound on the profile text (900 fits MiniLM's 256-token window)
    item_chars: int = 160  # each quoted item is cut to this
    summary_labels: int = 12  # most frequent labels listed
    query_terms: int = 10  # the user-level BM25 query: this many most frequent content words
    features: int = 0  # dimensions of the label-statistics vector appended to the text embedding (0: none)


# The settings profile ids were first written with. An embedder's id names every setting that
# differs from these (p2p.profile.embedder.embedder_id), so an id does not change when a default
# above does: stores and profiles written before keep their ids.
ID_BASE = ProfileConfig(top_k=8, max_chars=2000, item_chars=160, summary_labels=12, query_terms=10, features=0)
