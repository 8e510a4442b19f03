"""Recorded prefills of the unedited model, replayed from a trial's first edited layer."""

from __future__ import annotations

import contextlib

import pytest
import tiny_models as tm
import torch
from abliterate import generation, hf_compat, prompting
from abliterate.ablation import AblationParams, Kernel
from abliterate.architecture import discover
from abliterate.editors import InPlaceEditor, LoraEditor
from abliterate.evaluation import EvalSettings, Evaluator, measure
from abliterate.kl import first_token_logprobs, kl_divergence
from abliterate.leading_layers import LeadingLayers
from abliterate.refusal import RefusalDetector
from test_generation import PROMPTS
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

# Zero on layer 0, 0.5 on layer 1, 1.2 on layer 2: the edit starts at layer 1.
FROM_LAYER_1 = AblationParams(
    direction_index=1.5,
    kernels={"attn_out": Kernel(1.2, 2.0, 0.5, 1.0), "mlp_down": Kernel(1.2, 2.0, 0.5, 1.0)},
)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _texts(tokenizer, system_prompt="Be brief."):
    return prompting.chat_texts(tokenizer, PROMPTS, system_prompt=system_prompt)


def _directions() -> torch.Tensor:
    return torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("factory", ["llama", "qwen3", "moe_fused"])
@pytest.mark.parametrize("system_prompt", ["Be brief.", None])
def test_replay_from_any_layer_matches_the_full_prefill(factory, system_prompt, tokenizer):
    # On the unedited model, starting from any recorded layer input must give what the whole model
    # gives: the same logits (KL path) and, decoding on from the assembled cache, the same tokens.
    model = tm.FACTORIES[factory]()
    texts = _texts(tokenizer, system_prompt)
    enc = prompting.encode(tokenizer, texts[:4], "cpu")
    leading = LeadingLayers(model)
    assert leading.record(enc, keep_cache=True) and len(leading) == 1
    with torch.inference_mode():
        full = generation.prefill(model, enc, use_cache=False)[0].logits[:, -1]
    expected = generation.generate_ids(model, tokenizer, texts[:4], 8, batch_size=4)
    for first in range(tm.LAYERS + 1):  # LAYERS: nothing edited, only the final norm runs
        prefill = leading.prefill_from(first)
        with torch.inference_mode():
            replayed = prefill(model, enc, use_cache=False)[0].logits[:, -1]
        torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
        assert generation.generate_ids(model, tokenizer, texts[:4], 8, 4, prefill_fn=prefill) == expected


@pytest.mark.parametrize("in_place", [True, False], ids=["direct", "lora"])
def test_trial_scores_are_the_same_with_and_without_recorded_prefills(in_place, tokenizer):
    texts = _texts(tokenizer)
    harmful, harmless = texts[:5], texts[4:]
    detector = RefusalDetector(["a"])
    model = tm.tiny_llama()
    base = measure(model, tokenizer, EvalSettings(8, 3, detector), harmful, harmless)
    ablator = (InPlaceEditor if in_place else LoraEditor)(model, discover(model), _directions())
    plain = Evaluator(ablator.model, tokenizer, harmful, harmless, base.logprobs, 8, 3, detector)
    reusing = Evaluator(ablator.model, tokenizer, harmful, harmless, base.logprobs, 8, 3, detector,
                        reuse_layers=True)
    assert ablator.first_edited_layer == tm.LAYERS  # nothing edited yet
    ablator.apply(FROM_LAYER_1)
    assert ablator.first_edited_layer == 1
    want, got = plain.score(), reusing.score(first_edited=ablator.first_edited_layer)
    assert want["kl"] > 0 and got["kl"] == pytest.approx(want["kl"], rel=1e-6, abs=1e-9)
    assert got["refusals"] == want["refusals"]
    assert reusing.responses() == plain.responses()
    ablator.reset()
    # nothing edited: only the final norm and the head run (PEFT's wrapped model differs from the
    # bare one by rounding, hence the comparison with the plain evaluator, not with 0)
    assert reusing.score(first_edited=ablator.first_edited_layer)["kl"] == plain.score()["kl"]
    assert reusing.responses() == plain.responses() == base.responses


def test_sliding_window_models_prefill_every_layer(tokenizer):
    model = tm.FACTORIES["gemma3_text"]()
    texts = _texts(tokenizer)
    leading = LeadingLayers(model)
    assert not leading.enabled
    assert not leading.record(prompting.encode(tokenizer, texts[:3], "cpu"), keep_cache=False)
    lp = first_token_logprobs(model, tokenizer, texts, 3)
    ev = Evaluator(model, tokenizer, texts[:3], texts, lp, 4, 3, reuse_layers=True)
    assert ev.score(first_edited=1)["kl"] == 0.0


def test_small_budget_keeps_fewer_layer_inputs_and_stays_exact(tokenizer):
    model = tm.tiny_llama()
    texts = _texts(tokenizer)
    enc = prompting.encode(tokenizer, texts, "cpu")
    # room for about two layers' inputs (those of the rows' own tokens) and the prefix's KV cache
    per_layer = enc["input_ids"].numel() * tm.HIDDEN * 4
    leading = LeadingLayers(model, budget_bytes=2 * per_layer + 10_000)
    assert leading.record(enc, keep_cache=False)
    (recording,) = leading._recordings.values()
    assert recording.stride > 1 and leading.used <= leading.budget
    with torch.inference_mode():
        full = generation.prefill(model, enc, use_cache=False)[0].logits
        replayed = leading.prefill_from(tm.LAYERS - 1)(model, enc, use_cache=False)[0].logits
    torch.testing.assert_close(replayed, full, rtol=0, atol=1e-6)
    # no budget: nothing recorded, and prefills run every layer
    empty = LeadingLayers(model, budget_bytes=0)
    assert not empty.record(prompting.encode(tokenizer, texts[:2], "cpu"), keep_cache=False)
    assert len(empty) == 0
    lp = first_token_logprobs(model, tokenizer, texts[:2], 2, prefill_fn=empty.prefill_from(2))
    assert kl_divergence(lp, first_token_logprobs(model, tokenizer, texts[:2], 2)) == 0.0


def test_a_replay_that_differs_turns_reuse_off(tokenizer, monkeypatch, caplog):
    # An architecture whose layers need more than the decoder's shared inputs would replay wrongly;
    # here the slice skips one layer too many.
    real = hf_compat.decoder_slice

    @contextlib.contextmanager
    def one_too_many(decoder, start):
        with real(decoder, start + 1):
            yield

    monkeypatch.setattr(hf_compat, "decoder_slice", one_too_many)
    model = tm.tiny_llama()
    leading = LeadingLayers(model)
    with caplog.at_level("INFO", logger="abliterate.leading_layers"):
        assert not leading.record(prompting.encode(tokenizer, _texts(tokenizer), "cpu"), keep_cache=False)
    assert not leading.enabled and len(leading) == 0 and "differs" in caplog.text
