"""First-token log-probabilities, KL divergence and the evaluator on a tiny model."""

from __future__ import annotations

import math

import pytest
import tiny_models
import torch
from abliterate import errors, prompting
from abliterate.evaluation import EvalSettings, Evaluator, measure
from abliterate.kl import first_token_logprobs, kl_divergence, kl_per_prompt
from abliterate.refusal import RefusalDetector
from test_generation import PROMPTS
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer):
    return prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")


def test_identical_is_zero():
    lp = torch.randn(5, 11).log_softmax(-1)
    assert kl_divergence(lp, lp.clone()) == 0.0


def test_hand_computed():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])
    # row 1: 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2; row 2: 0; batchmean over 2 rows
    expected = 0.125 * math.log(2)
    assert kl_divergence(p.log(), q.log()) == pytest.approx(expected, rel=1e-6)
    # direction: KL(base ‖ edited), not the reverse
    reverse = (0.25 * math.log(0.5) + 0.5 * math.log(2)) / 2
    assert kl_divergence(q.log(), p.log()) == pytest.approx(reverse, rel=1e-6)


def test_per_prompt_values_average_to_the_divergence():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])
    per = kl_per_prompt(p.log(), q.log())
    assert per.shape == (2,)
    assert per.tolist() == pytest.approx([0.25 * math.log(2), 0.0], abs=1e-7)
    lp = torch.randn(7, 13).log_softmax(-1)
    other = torch.randn(7, 13).log_softmax(-1)
    assert kl_per_prompt(lp, other).mean().item() == pytest.approx(kl_divergence(lp, other), rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_per_prompt(lp, other[:3])


def test_negative_raises_and_tiny_negative_is_returned():
    base = torch.tensor([[0.5, 0.5]]).log()
    not_normalised = torch.tensor([[1.0, 1.0]]).log()
    with pytest.raises(errors.NumericalError, match="negative"):
        kl_divergence(base, not_normalised)
    tiny = kl_divergence(base.double(), base.double() + 1e-8)  # rounding-sized: kept as computed
    assert -1e-6 < tiny < 0
    with pytest.raises(errors.NumericalError):
        kl_divergence(base, torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError):
        kl_divergence(base, torch.zeros(2, 2))


def test_first_token_logprobs_match_unpadded_forward(tokenizer, texts):
    model = tiny_models.tiny_llama()
    lp = first_token_logprobs(model, tokenizer, texts, batch_size=3)
    assert lp.shape == (len(texts), model.config.vocab_size) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(len(texts)))
    with torch.inference_mode():
        for i in (0, 2, 6):
            enc = prompting.encode(tokenizer, [texts[i]], "cpu")
            ref = model(**enc).logits[0, -1].float().log_softmax(-1)
            torch.testing.assert_close(lp[i], ref, atol=1e-5, rtol=1e-5)
    assert kl_divergence(lp, first_token_logprobs(model, tokenizer, texts, batch_size=3)) == 0.0


def test_evaluator_scores_and_detects_edit(tokenizer, texts):
    model = tiny_models.tiny_llama()
    harmful, harmless = texts[:4], texts[4:]
    # every response of a random model counts as a refusal with a marker it emits constantly
    detector = RefusalDetector(["i can't"])
    base = measure(model, tokenizer, EvalSettings(max_new_tokens=6, batch_size=4, detector=detector), harmful, harmless)
    assert base.n == 4 and len(base.responses) == 4 and base.logprobs.shape[0] == 3
    ev = Evaluator(model, tokenizer, harmful, harmless, base.logprobs, 6, 4, detector)
    s = ev.score()
    assert set(s) == {"refusals", "n", "kl", "seconds"}
    assert s["kl"] == 0.0 and s["refusals"] == base.refusals and s["n"] == 4
    assert ev.responses() == base.responses
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    assert ev.score()["kl"] > 1e-4
