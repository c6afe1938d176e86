"""Prompts too long for their budget lose the middle of the user's text, never the chat header or the instruction."""

from p2p.task.prompt import PromptFormat, chat_prompt
from p2p.train.batch import IGNORE, encode_example

INSTRUCTION = "Generate a headline for the following article:"
ARTICLE = " ".join(f"word{i}" for i in range(400)) + " the final sentence matters."


def test_short_prompts_are_the_chat_template_unchanged(tiny):
    tok = tiny[1]
    fmt = PromptFormat(tok)
    text = "Score this review from 1 to 5."
    assert fmt.ids(text, budget=10_000) == tok(chat_prompt(tok, text), add_special_tokens=False)["input_ids"]


def test_long_prompts_keep_header_instruction_and_end(tiny):
    tok = tiny[1]
    fmt = PromptFormat(tok)
    full = fmt.ids(f"{INSTRUCTION} {ARTICLE}")
    ids = fmt.ids(f"{INSTRUCTION} {ARTICLE}", budget=120)
    assert len(full) > 400 and len(ids) == 120
    head = tok(chat_prompt(tok, "\x00").split("\x00")[0], add_special_tokens=False)["input_ids"]
    assert ids[: len(head)] == head  # the chat header (system prompt, user turn) is intact
    text = tok.decode(ids)
    assert INSTRUCTION in text and "the final sentence matters." in text and " ... " in text
    assert text.rstrip().endswith("assistant")  # the generation prompt is the last thing, as before
    assert "word200" not in text  # the middle went


def test_training_examples_keep_their_target_when_the_prompt_is_cut(tiny):
    tok = tiny[1]
    fmt = PromptFormat(tok)
    ids, labels = encode_example(fmt, f"{INSTRUCTION} {ARTICLE}", "Final Sentence Matters", max_len=96)
    assert len(ids) == len(labels) == 96
    target = [t for t in labels if t != IGNORE]
    assert tok.decode(target[:-1]) == "Final Sentence Matters" and target[-1] == tok.eos_token_id
    assert INSTRUCTION in tok.decode(ids)
