"""Streaming text with stop strings, on SmolLM2's real byte-level tokenizer."""

from p2p.generation.text_stream import TextStream
from p2p.model.base import load_tokenizer


def _stream(text: str, stop=(), context_text: str = "Say:"):
    tok = load_tokenizer("tiny-random")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tok, tuple(stop), context=tok(context_text, add_special_tokens=False)["input_ids"])
    pieces = [s.push(t) for t in ids]
    pieces.append(s.finish())
    return pieces, s


def test_pieces_add_up_to_the_decoded_text_with_multibyte_characters():
    text = "Café ☕ naïve 東京 — done 🎉!"
    pieces, s = _stream(text)
    assert "".join(pieces) == text == s.text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert sum(1 for p in pieces if p) > 5  # it streams, not all at the end


def test_stop_string_spanning_tokens_is_never_sent():
    pieces, s = _stream("The answer is 42. END OF ANSWER and more text", stop=("END OF",))
    assert s.stopped and s.text == "The answer is 42. "
    assert "".join(pieces) == "The answer is 42. "
    assert not any("END" in p for p in pieces)


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    pieces, s = _stream("a b c ENDLESS d", stop=("END.",))
    assert not s.stopped and "".join(pieces) == "a b c ENDLESS d"


def test_earliest_of_several_stops_wins():
    pieces, s = _stream("one two three four", stop=("four", "two"))
    assert "".join(pieces) == "one " and s.stopped
