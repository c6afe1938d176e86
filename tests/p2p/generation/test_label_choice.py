"""Decoding within a label set: one prompt pass plus the labels together equals scoring each full sequence."""

import copy

import pytest
import torch
from numerics import TINY_DEPTH, assert_same_function

from p2p.generation.label_choice import LabelChooser
from p2p.model.adapted import AdaptedModel
from p2p.model.hypernet import Hypernetwork, make_config
from p2p.task.prompt import PromptFormat

LABELS = ["sci-fi", "based on a book", "comedy", "twist ending", "fun", "funny"]


@pytest.mark.numerics
def test_label_scores_equal_full_sequence_log_probs_with_and_without_an_adapter(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    config = make_config(model, "tiny-random", "hashing", 384)
    torch.manual_seed(0)
    hypernet = Hypernetwork(config)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    adapter = hypernet.user_adapters(torch.randn(1, 384))[0]
    adapted = AdaptedModel(model, tok, config)
    chooser = LabelChooser(adapted, LABELS)
    prompt = PromptFormat(tok).ids("Which tag fits this movie? A crew lost in space.")
    results = []
    for user in (None, adapter):
        scores = chooser.scores(prompt, user)
        reference = []
        for ids in chooser.label_ids:  # each label + EOS scored by its own full forward
            with torch.no_grad(), adapted.applied(adapted.stack([user]) if user else None):
                logp = torch.log_softmax(adapted.model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
            reference.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ids)))
        assert_same_function(scores, torch.stack(reference), TINY_DEPTH, what="label scores")
        assert chooser.choose(prompt, user) == LABELS[int(torch.stack(reference).argmax())]
        results.append(scores)
    assert not torch.allclose(results[0], results[1])  # the adapter changes the scores
    # "fun" is a prefix of "funny" in tokens: EOS is scored, so the two labels get different scores
    assert results[0][LABELS.index("fun")] != results[0][LABELS.index("funny")]
