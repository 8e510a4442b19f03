"""Generation: same tokens as transformers' greedy generate, early stops, pruning keeps order."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from abliterate import batching, errors, prompting
from abliterate.generation import eos_token_ids, generate, generate_ids
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

PROMPTS = [
    "Hi",
    "How do I bake bread at home?",
    "Tell me a story about a dragon and a knight.",
    "2+2?",
    "Write a haiku about autumn leaves falling slowly.",
    "What is the capital of France?",
    "ok",
]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer):
    return prompting.chat_texts(tokenizer, PROMPTS, system_prompt=None)


@pytest.fixture(scope="module")
def llama():
    return tiny_models.tiny_llama()


def hf_greedy(model, tokenizer, texts, max_new_tokens):
    """Reference: transformers' generate on each text alone (no padding), cut after EOS."""
    eos = eos_token_ids(model, tokenizer)
    out = []
    for text in texts:
        enc = prompting.encode(tokenizer, [text], "cpu")
        ids = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos),
        )[0, enc["input_ids"].shape[1] :].tolist()
        for k, tok in enumerate(ids):
            if tok in eos:
                ids = ids[: k + 1]
                break
        out.append(ids)
    return out


def test_chat_texts_and_left_padding(tokenizer, texts):
    assert texts[0] == "<s><|user|>Hi<|end|><|assistant|>"
    enc = prompting.encode(tokenizer, texts[:2], "cpu")
    assert enc["input_ids"].dtype == torch.int64
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()
    assert (enc["input_ids"][:, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")).all()
    assert (enc["input_ids"] == tokenizer.bos_token_id).sum() == 2  # no doubled BOS
    assert tokenizer.padding_side == "right"  # the call did not change the tokenizer


def test_missing_chat_template_names_config_key(tokenizer):
    bare = char_tokenizer()
    bare.chat_template = None
    with pytest.raises(errors.ModelLoadError, match="model.chat_template"):
        prompting.chat_texts(bare, ["x"], None)


@pytest.mark.parametrize("factory", ["llama", "gemma3_text"])
def test_matches_hf_greedy(factory, tokenizer, texts, llama):
    # gemma3 has sliding-window layers (window 8 < sequence): a second kind of cache layer to prune
    model = llama if factory == "llama" else tiny_models.FACTORIES[factory]()
    ours = generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=3)
    assert ours == hf_greedy(model, tokenizer, texts, 12)


class StopAfter:
    """Rigged detector: decides as soon as the text so far contains its row's stop string."""

    def __init__(self, stops):
        self.stops = stops
        self.calls = 0

    def verdict(self, partial_text):
        self.calls += 1
        return True if any(s in partial_text for s in self.stops) else None


def test_early_stop_prunes_rows_and_keeps_order(tokenizer, texts, llama):
    model = llama
    budget = 16
    full = generate_ids(model, tokenizer, texts, max_new_tokens=budget, batch_size=4)
    full_text = tokenizer.batch_decode(full, skip_special_tokens=True)
    # rows stop at different steps: each stop string is a short piece of its own reference text
    stops = []
    for i, t in enumerate(full_text):
        cut = 1 + i % 5
        stops.append(t[cut : cut + 2] if len(t) >= cut + 2 else None)
    stops = [s for s in stops if s and s.strip()]
    assert len(stops) >= 3, full_text
    detector = StopAfter(stops)
    early = generate_ids(
        model, tokenizer, texts, max_new_tokens=budget, batch_size=4, detector=detector
    )
    stopped = 0
    for ref, got in zip(full, early):
        assert got == ref[: len(got)]  # same tokens, only shorter, in the original order
        # stopped exactly at the first token whose text shows a stop string, or ran to the end
        first = next(
            (
                k
                for k in range(1, len(ref) + 1)
                if any(s in tokenizer.decode(ref[:k], skip_special_tokens=True) for s in stops)
            ),
            len(ref),
        )
        assert len(got) == first
        stopped += len(got) < len(ref)
    assert stopped >= 3
    texts_out = generate(
        model, tokenizer, texts, max_new_tokens=budget, batch_size=4, detector=detector
    )
    assert texts_out == tokenizer.batch_decode(early, skip_special_tokens=True)


def test_budget_zero_and_empty(tokenizer, texts, llama):
    model = llama
    assert generate(model, tokenizer, texts[:2], max_new_tokens=0, batch_size=2) == ["", ""]
    assert generate(model, tokenizer, [], max_new_tokens=5, batch_size=2) == []


def test_batch_size_does_not_change_tokens(tokenizer, texts, llama):
    model = llama
    a = generate_ids(model, tokenizer, texts, max_new_tokens=8, batch_size=1)
    b = generate_ids(model, tokenizer, texts, max_new_tokens=8, batch_size=7)
    assert a == b


def test_auto_batch_size_off_cuda_uses_default(tmp_path):
    def probe(size):
        raise AssertionError("no probe off CUDA")

    assert batching.auto_batch_size(probe, "cpu", "m", tmp_path / "b.json", 1, 256) == batching.NON_CUDA_DEFAULT
    assert batching.auto_batch_size(probe, "cpu", "m", tmp_path / "b.json", 1, 8) == 8
    assert not (tmp_path / "b.json").exists()


def test_auto_batch_size_doubles_until_oom_and_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(batching, "_device_id", lambda device: "FakeGPU|80000MiB")
    freed = []
    monkeypatch.setattr(batching, "free_memory", lambda: freed.append(1))
    tried = []

    def probe(size):
        tried.append(size)
        if size > 12:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    cache = tmp_path / "batch_sizes.json"
    assert batching.auto_batch_size(probe, "cuda", "m", cache, start=1, max_size=64) == 8
    assert tried == [1, 2, 4, 8, 16] and freed
    assert batching.auto_batch_size(probe, "cuda", "m", cache, start=1, max_size=64) == 8
    assert len(tried) == 5  # second call answered from the cache
    assert batching.auto_batch_size(probe, "cuda", "m", cache, start=1, max_size=4) == 4
    assert batching.auto_batch_size(probe, "cuda", "other", cache, start=2, max_size=6) == 6
    assert tried[5:] == [2, 4, 6]
    with pytest.raises(errors.ConfigError, match="out of GPU memory"):
        batching.auto_batch_size(probe, "cuda", "big", cache, start=16, max_size=64)


@pytest.mark.parametrize("factory", ["llama", "qwen3", "moe_fused", "gemma3_text"])
def test_shared_prefix_prefill_matches_hf_greedy(factory, tokenizer, llama):
    # A system prompt gives every text the same first tokens: prefill computes them once (gemma3's
    # sliding window cannot have a gap after the prefix, so it takes the plain path).
    from abliterate.generation import full_attention_only, prefill, shared_prefix_length

    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")
    enc = prompting.encode(tokenizer, texts, "cpu")
    # "<s><|system|>Be brief.<|end|><|user|>" is shared, the character tokenizer splits it per character
    assert shared_prefix_length(enc["input_ids"], enc["attention_mask"]) == 4 + len("Be brief.")
    model = llama if factory == "llama" else tiny_models.FACTORIES[factory]()
    assert full_attention_only(model) == (factory != "gemma3_text")
    with torch.inference_mode():
        out, mask, positions = prefill(model, enc)
        assert mask.shape[1] == enc["input_ids"].shape[1]
        for i, text in enumerate(texts):
            alone = model(**prompting.encode(tokenizer, [text], "cpu")).logits[0, -1]
            torch.testing.assert_close(out.logits[i, -1], alone, rtol=1e-5, atol=1e-5)
    ours = generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=4)
    assert ours == hf_greedy(model, tokenizer, texts, 12)
