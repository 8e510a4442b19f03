"""Evaluator.score with a refusal cap: KL first, then a generation that stops once dominated."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from abliterate import prompting
from abliterate.evaluation import EvalSettings, Evaluator, measure
from abliterate.generation import generate_ids
from abliterate.refusal import RefusalDetector
from test_generation import PROMPTS, StopAfter, _stop_strings
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

SCORES = ("refusals", "n", "kl")


class Rigged(StopAfter):
    """Judges a response a refusal when it shows one of the stop strings."""

    def is_refusal(self, text):
        return any(s in text for s in self.stops)


@pytest.fixture(scope="module")
def evaluator():
    tokenizer = char_tokenizer()
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt=None)
    model = tm.tiny_llama()
    base = measure(model, tokenizer, EvalSettings(16, 4, RefusalDetector()), texts, texts)
    with torch.no_grad():  # an edited model, so that KL > 0
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    stops = _stop_strings(tokenizer, generate_ids(model, tokenizer, texts, 16, 4))
    return Evaluator(model, tokenizer, texts, texts, base.logprobs, 16, 4, Rigged(stops))


def test_a_cap_that_is_not_reached_changes_nothing(evaluator):
    full = evaluator.score()
    assert full["refusals"] >= 3 and full["kl"] > 0 and "dominated_by" not in full
    asked = []

    def cap(kl, n):
        asked.append((kl, n))
        return (full["refusals"] + 1, 5)

    capped = evaluator.score(refusal_cap=cap)
    assert asked == [(full["kl"], len(PROMPTS))]  # once, with this model's KL
    assert {k: capped[k] for k in SCORES} == {k: full[k] for k in SCORES}
    assert "dominated_by" not in capped
    assert "dominated_by" not in evaluator.score(refusal_cap=lambda kl, n: None)


def test_a_reached_cap_stops_the_generation_with_a_lower_bound(evaluator):
    full = evaluator.score()
    responses = evaluator.responses()
    capped = evaluator.score(refusal_cap=lambda kl, n: (2, 7))
    assert capped["dominated_by"] == 7 and 2 <= capped["refusals"] <= full["refusals"]
    assert capped["kl"] == full["kl"]
    assert evaluator.responses() == responses  # the stopped run's are not kept: generated in full
    nothing = evaluator.score(refusal_cap=lambda kl, n: (0, 3))  # dominated by its KL alone
    assert nothing["refusals"] == 0 and nothing["dominated_by"] == 3
