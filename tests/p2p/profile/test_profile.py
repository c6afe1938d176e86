from p2p.data.synthetic import generate_chunk
from p2p.profile.config import ProfileConfig
from p2p.profile.embedder import profile_hash
from p2p.profile.text import build_profile
from p2p.task.registry import GENRE_TAGS


def test_profile_is_deterministic_bounded_and_summary_first():
    users = generate_chunk(0, 20, 20, seed=5)
    cfg = ProfileConfig(top_k=6, max_chars=1200)
    for u in users:
        text = build_profile(u.history, cfg)
        assert text == build_profile(u.history, cfg)
        assert len(text) <= 1200
        first = text.splitlines()
        assert first[0].startswith("History: ") and first[1].startswith("Labels used: ")
        # the user's own tag for their most frequent genre is in the summary line
        tags = [h["label"] for h in u.history if h["item_id"].split("-")[-2] == "tag"]
        top = max(set(tags), key=tags.count)
        assert top in first[1]
        assert "Scores given: mean" in text and "Examples:" in text


def test_profile_items_are_top_k_and_order_independent():
    u = generate_chunk(0, 1, 1, seed=2)[0]
    cfg = ProfileConfig(top_k=5, max_chars=2000)  # room for all five items
    text = build_profile(u.history, cfg)
    assert text == build_profile(list(reversed(u.history)), cfg)
    assert sum(1 for line in text.splitlines() if line.startswith("- ")) == 5


def test_profile_of_empty_and_short_history():
    assert build_profile([]) .startswith("No history")
    h = [{"item_id": "a", "text": "A heist in Paris.", "label": GENRE_TAGS["crime"][0], "ts": 5}]
    text = build_profile(h)
    assert "noir 1" in text and "- A heist in Paris. => noir" in text


def test_profile_hash_depends_on_text_and_encoder():
    assert profile_hash("x", "minilm") != profile_hash("x", "hashing")
    assert profile_hash("x", "minilm") != profile_hash("y", "minilm")
    assert profile_hash("x", "minilm") == profile_hash("x", "minilm")


def test_lamp_2_tags_are_categories_with_a_bin_each():
    from p2p.profile.features import profile_features
    from p2p.task.registry import LAMP_2_TAGS

    # Every LaMP-2 tag is a category (its longest, "based on a book", included) and, at the LaMP
    # configs' 512 bins, has a bin of its own: the features tell any two tags' shares apart.
    cfg = ProfileConfig(features=512)
    history = [{"item_id": str(i), "text": "a movie", "label": tag, "ts": i}
               for i, tag in enumerate(t for n, tag in enumerate(LAMP_2_TAGS) for t in [tag] * (n + 1))]
    f = profile_features(history, cfg)
    total = len(history)
    assert sorted(round(float(x) * total) for x in f[f > 0]) == list(range(1, len(LAMP_2_TAGS) + 1))


def test_a_timestamp_past_year_9999_is_a_number_not_a_crash():
    """The API accepts any int64 `ts`; a date past 9999 once raised ValueError (a 500 on POST .../adapter)."""
    history = [{"item_id": "a", "text": "A film.", "label": "scary", "ts": 2**62},
               {"item_id": "b", "text": "Another.", "label": "scary", "ts": 1_700_000_000}]
    text = build_profile(history, ProfileConfig())
    assert str(2**62) in text and "2023-11-14" in text
