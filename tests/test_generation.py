"""Generation: same tokens as transformers' greedy generate, early stops, pruning keeps order."""

from __future__ import annotations

import functools

import pytest
import tiny_models
import torch
from abliterate import batching, errors, prompting
from abliterate.generation import RefusalLimitReached, eos_token_ids, generate, generate_ids
from generation_helpers import PROMPTS, StopAfter
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

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



def test_template_that_rejects_a_system_turn_names_config_key():
    strict = char_tokenizer()
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert prompting.chat_texts(strict, ["x"], None) == ["x"]
    with pytest.raises(errors.ModelLoadError, match=r"System role not supported.*model\.system_prompt"):
        prompting.chat_texts(strict, ["x"], "be brief")


@pytest.mark.parametrize("factory", ["llama", "gemma3_text"])
def test_matches_hf_greedy(factory, tokenizer, texts, llama):
    # gemma3 has sliding-window layers (window 8 < sequence): a second kind of cache layer to prune
    model = llama if factory == "llama" else tiny_models.FACTORIES[factory]()
    ours = generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=3)
    assert ours == hf_greedy(model, tokenizer, texts, 12)


def _stop_strings(tokenizer, full) -> list[str]:
    """Rows stop at different steps: each stop string is a short piece of its own reference text."""
    stops = []
    for i, t in enumerate(tokenizer.batch_decode(full, skip_special_tokens=True)):
        cut = 1 + i % 5
        stops.append(t[cut : cut + 2] if len(t) >= cut + 2 else None)
    stops = [s for s in stops if s and s.strip()]
    assert len(stops) >= 3, stops
    return stops


def test_early_stop_prunes_rows_and_keeps_order(tokenizer, texts, llama):
    model = llama
    budget = 16
    full = generate_ids(model, tokenizer, texts, max_new_tokens=budget, batch_size=4)
    stops = _stop_strings(tokenizer, full)
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


def test_max_refusals_abandons_the_generation_once_reached(tokenizer, texts, llama):
    full = generate_ids(llama, tokenizer, texts, max_new_tokens=16, batch_size=4)
    stops = _stop_strings(tokenizer, full)
    early = generate_ids(llama, tokenizer, texts, 16, batch_size=4, detector=StopAfter(stops))
    n_stopped = sum(len(got) < len(ref) for got, ref in zip(early, full))
    assert n_stopped >= 3
    # a limit never reached changes nothing
    assert early == generate_ids(
        llama, tokenizer, texts, 16, batch_size=4, detector=StopAfter(stops), max_refusals=n_stopped + 1
    )
    with pytest.raises(RefusalLimitReached) as stop:
        generate_ids(llama, tokenizer, texts, 16, batch_size=4, detector=StopAfter(stops), max_refusals=2)
    assert stop.value.refusals >= 2
    detector = StopAfter(stops)
    with pytest.raises(RefusalLimitReached) as stop:
        generate(llama, tokenizer, texts, 16, batch_size=4, detector=detector, max_refusals=0)
    assert stop.value.refusals == 0 and detector.calls == 0  # nothing generated
    with pytest.raises(ValueError, match="detector"):
        generate_ids(llama, tokenizer, texts, 16, batch_size=4, max_refusals=1)


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
        out, mask, _positions = prefill(model, enc)
        assert mask.shape[1] == enc["input_ids"].shape[1]
        for i, text in enumerate(texts):
            alone = model(**prompting.encode(tokenizer, [text], "cpu")).logits[0, -1]
            torch.testing.assert_close(out.logits[i, -1], alone, rtol=1e-5, atol=1e-5)
    ours = generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=4)
    assert ours == hf_greedy(model, tokenizer, texts, 12)


@pytest.mark.parametrize("factory", ["llama", "qwen3", "gemma3_text"])
def test_rows_freed_by_early_stops_are_refilled(factory, tokenizer, monkeypatch):
    # Continuous batching: with 2 rows live at once and rows stopping early, waiting prompts are
    # prefilled into the running batch; every row still gets the tokens it gets alone. gemma3's
    # sliding-window cache cannot take rows mid-batch: it runs batch after batch, same tokens.
    from abliterate import generation

    model = tiny_models.FACTORIES[factory]() if factory != "llama" else tiny_models.tiny_llama()
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")
    alone = [generate_ids(model, tokenizer, [t], max_new_tokens=10, batch_size=1)[0] for t in texts]
    text = tokenizer.batch_decode(alone, skip_special_tokens=True)
    # rows that start like the first one stop after two characters, the others run on
    detector = StopAfter([text[0][:2]])
    assert 0 < sum(t.startswith(text[0][:2]) for t in text) < len(text) - 1, text
    expected = [generate_ids(model, tokenizer, [t], 10, 1, detector)[0] for t in texts]
    live, prefills = [], []
    real_prefill, real_forward = generation.prefill, model.forward

    def counting_prefill(model, enc, *args, **kwargs):
        prefills.append(enc["input_ids"].shape[0])
        return real_prefill(model, enc, *args, **kwargs)

    @functools.wraps(real_forward)  # keeps the signature that generation inspects
    def counting_forward(*args, **kwargs):
        live.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(generation, "prefill", counting_prefill)
    monkeypatch.setattr(model, "forward", counting_forward)
    assert generate_ids(model, tokenizer, texts, 10, batch_size=2, detector=detector) == expected
    assert max(live) <= 2 and sum(prefills) == len(texts)
    if factory == "gemma3_text":
        assert prefills == [2, 2, 2, 1]  # whole batches only
    else:
        assert len(prefills) > 4 and 1 in prefills  # single rows joined a running batch


def test_kv_cache_grows_in_place_and_takes_over_replaced_tensors():
    from abliterate.hf_compat import new_cache

    assert new_cache(tiny_models.FACTORIES["gemma3_text"]()) is None  # sliding layers: model's own
    cache = new_cache(tiny_models.tiny_llama())
    layer = cache.layers[0]
    steps = [torch.randn(2, 1, 1, 4) for _ in range(3)]
    layer.update(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4))
    storage = layer.keys.untyped_storage().data_ptr()
    for step in steps:
        keys, _ = layer.update(step, step)
    assert keys.untyped_storage().data_ptr() == storage  # written into spare room, not copied
    torch.testing.assert_close(keys[..., 5:, :], torch.cat(steps, dim=-2))
    # pruning replaces the tensors: the next update continues from the pruned rows
    cache.reorder_cache(torch.tensor([1]))
    before = layer.keys.clone()
    keys, _ = layer.update(steps[0][1:], steps[0][1:])
    torch.testing.assert_close(keys, torch.cat([before, steps[0][1:]], dim=-2))
