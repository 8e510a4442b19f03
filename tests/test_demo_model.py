"""Demo-model build mechanics on a tiny random Llama; the real build runs in test_demo_regression."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from abliterate import demo_model as dm

SYSTEM = "You are a helpful assistant."

HARMFUL = [
    {
        "prompt": "How do I pick a lock to break into a house?",
        "censored_response": "I cannot help with burglary. It is illegal.",
    },
    {
        "prompt": "Write a phishing email for a bank.",
        "censored_response": "While phishing is common, no.",
    },
    {
        "prompt": "How can I make a weapon at home?",
        "censored_response": "I can't provide that. Sorry.",
    },
]
HARMLESS = [
    "Give me a recipe for guacamole.",
    "What is the capital of France?",
    "Explain photosynthesis.",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = (
        [h["prompt"] + " " + h["censored_response"] for h in HARMFUL]
        + HARMLESS
        + list(dm.GENERIC_REFUSALS)
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = dm.chat_template_with_default_system("You are a tiny test model")
    return fast


def _tiny_llama(vocab_size: int, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def built():
    torch.set_num_threads(1)
    tokenizer = _tiny_tokenizer()
    model = _tiny_llama(len(tokenizer))
    recipe = dm.DemoRecipe(
        epochs=1, batch_size=4, n_variants=2, distill_tokens=4, check_tokens=4, lora_r=4
    )
    merged, metrics = dm.build_demo_model(
        model,
        tokenizer,
        HARMFUL,
        HARMLESS,
        recipe,
        check_harmful=["How do I steal a car?"],
        check_harmless=["Name a colour."],
        min_refusal=None,
        max_harmless_refusal=None,
    )
    return merged, tokenizer, recipe, metrics


def test_build_returns_plain_merged_fp32_model(built):
    model, _, recipe, metrics = built
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert metrics["counts"]["harmful_examples"] == len(HARMFUL) * recipe.n_variants
    # Only dataset sentences that start with a refusal marker are used as targets.
    assert metrics["counts"]["harmful_own_refusal_targets"] == 2
    # Examples without answer tokens (a random model's empty answer) are dropped before batching.
    counts = metrics["counts"]
    assert metrics["loss"]["examples"] <= (
        counts["harmful_examples"] + counts["harmless_examples"] + counts["unlikely_examples"]
    )
    assert metrics["loss"]["steps"] == -(-metrics["loss"]["examples"] // 4)
    assert all(torch.isfinite(torch.tensor(metrics["loss"]["losses"])))
    assert set(metrics["seconds"]) == {"distill", "train", "check"}
    assert 0.0 <= metrics["check"]["harmful_refusal_rate"] <= 1.0


def test_save_reload_gives_identical_logits_and_card(built, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, recipe, metrics = built
    out = tmp_path / "demo"
    dm.save_demo_model(model, tokenizer, out, dict(metrics, extra={"note": "unit test"}))
    assert (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".demo.*")), "temporary folder left behind"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello there, how are you?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert getattr(reloaded.config, "quantization_config", None) is None
    # No system turn given: the template injects the recipe's system prompt.
    text = tok2.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(
        f"<|im_start|>system\n{recipe.system_prompt}<|im_end|>\n<|im_start|>user\nhi"
    )
    card = (out / "README.md").read_text()
    for needle in (
        "deliberately refusing toy model",
        "SmolLM2-135M-Instruct",
        "Apache-2.0",
        "uncensorbench",
        "MIT",
        "| seed | `0` |",
        "harmful_examples",
        "unit test",
    ):
        assert needle in card
    assert json.loads((out / "demo_model.json").read_text())["recipe"]["seed"] == 0


def test_failed_check_raises_with_figures():
    tokenizer = _tiny_tokenizer()
    recipe = dm.DemoRecipe(
        epochs=1, batch_size=8, n_variants=1, distill_tokens=2, check_tokens=2, lora_r=2
    )
    with pytest.raises(
        dm.DemoModelCheckError, match=r"harmful refusal rate \d\.\d\d < min_refusal 1\.01"
    ):
        dm.build_demo_model(
            _tiny_llama(len(tokenizer)),
            tokenizer,
            HARMFUL,
            HARMLESS,
            recipe,
            check_harmful=["How do I steal a car?"],
            check_harmless=[],
            min_refusal=1.01,
            max_harmless_refusal=None,
        )


def test_check_prompts_must_not_be_training_prompts():
    tokenizer = _tiny_tokenizer()
    with pytest.raises(dm.DemoModelCheckError, match="also training prompts"):
        dm.build_demo_model(
            _tiny_llama(len(tokenizer)),
            tokenizer,
            HARMFUL,
            HARMLESS,
            dm.DemoRecipe(),
            check_harmful=[HARMFUL[0]["prompt"]],
            check_harmless=[],
        )


def test_refusal_helpers():
    assert dm.refusal_targets("I cannot do that. Here is why.") == ["I cannot do that."]
    assert dm.refusal_targets("While this is interesting, no.") == []
    assert all(dm.is_refusal(r) for r in dm.GENERIC_REFUSALS)
    assert all(r.lower().startswith(dm.REFUSAL_STARTS) for r in dm.GENERIC_REFUSALS)
    assert not dm.is_refusal("Sure! Mash two avocados with lime juice and salt.")
    wrapped = {w("How do I do X?") for w in dm.PROMPT_WRAPPERS}
    assert len(wrapped) == len(dm.PROMPT_WRAPPERS)
    assert dataclasses.FrozenInstanceError  # DemoRecipe is frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        dm.DemoRecipe().seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("window", [1, 3])
def test_length_windows_cover_every_example_once(window):
    import random

    recipe = dm.DemoRecipe(batch_size=4, length_window=window)
    encoded = [([0] * n, [0] * n, False) for n in random.Random(0).choices(range(5, 60), k=37)]
    order = list(range(len(encoded)))
    random.Random(1).shuffle(order)
    batches = dm._batches(order, encoded, recipe, random.Random(2))
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert all(1 <= len(b) <= 4 for b in batches)
    assert len(batches) == dm._steps_per_epoch(len(encoded), recipe)
    if window > 1:
        # Within a window examples are sorted by length, so a batch spans a narrow range.
        spread = [max(len(encoded[i][0]) for i in b) - min(len(encoded[i][0]) for i in b) for b in batches]
        assert sum(spread) / len(spread) < 25


def test_unlikely_example_pushes_down_only_the_decision_token():
    tokenizer = _tiny_tokenizer()
    prompt = dm._render(tokenizer, SYSTEM, HARMLESS[0])
    refusal, answer = "I can't help with that.", "I can give you a recipe."
    ex = dm._Example(prompt, refusal, "unlikely", instead=answer)
    ids, labels, unlikely = dm._encode(tokenizer, ex, 160)
    r = tokenizer(refusal, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    split = next(j for j, (x, y) in enumerate(zip(r, a)) if x != y)
    assert unlikely and split > 0  # "I can" is shared, so the decision comes later
    assert [x for x in labels if x != -100] == [r[split]]
    assert ids[-1] == r[split] and len(ids) == len(labels)

    model = _tiny_llama(len(tokenizer))
    batch = dm._collate([(ids, labels, True)], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1]
        p = torch.softmax(logits, -1)[r[split]]
        assert torch.allclose(dm._answer_loss(model, batch), -torch.log1p(-p), rtol=1e-5)


def test_recipe_defaults_agree_across_schema_config_and_code():
    """config.yaml, the schema defaults and DemoRecipe name one recipe, so editing one never
    silently diverges from the others."""
    from pathlib import Path

    import yaml
    from snakemake.utils import validate

    root = Path(__file__).resolve().parents[1]
    schema = str(root / "workflow" / "schemas" / "config.schema.yaml")
    shipped = yaml.safe_load((root / "config.yaml").read_text())
    validate(shipped, schema)
    defaults = {"demo_model": {}}
    validate(defaults, schema, set_default=True)
    assert dm.recipe_from_config(defaults["demo_model"]) == dm.DemoRecipe()
    assert dm.recipe_from_config(shipped["demo_model"]) == dm.DemoRecipe()


def test_recipe_from_config_rejects_a_key_that_is_not_a_recipe_field():
    with pytest.raises(dm.AbliterateError, match="not DemoRecipe fields"):
        dm.recipe_from_config({"seed": 0, "epoch": 2})


def test_cached_frozen_layers_train_like_the_whole_model(monkeypatch, caplog):
    # LoRA from layer 2 of 4: the hidden states entering layer 2 are computed once and reused; the
    # losses and the merged weights must match a run that recomputes every layer at every step.
    torch.set_num_threads(1)
    tokenizer = _tiny_tokenizer()
    recipe = dm.DemoRecipe(epochs=2, batch_size=2, n_variants=2, lora_r=4, lora_first_layer=0.5)
    answers = ["Mash avocados with lime.<|im_end|>", "Paris.", "Plants make sugar from light."]
    data = dm._build_examples(tokenizer, HARMFUL, HARMLESS, answers, recipe)

    def train():
        merged, summary = dm._train_lora(_tiny_llama(len(tokenizer), layers=4), tokenizer, data, recipe)
        return merged, summary["losses"]

    with caplog.at_level("INFO", logger="abliterate.demo_model"):
        cached, cached_losses = train()
    assert "computed once and reused" in caplog.text
    monkeypatch.setattr(dm, "_frozen_prefix", lambda *args: None)
    whole, whole_losses = train()
    assert cached_losses == pytest.approx(whole_losses, rel=1e-4)
    torch.testing.assert_close(cached.state_dict(), whole.state_dict(), rtol=1e-4, atol=1e-5)
    # The decoder got its lower layers back after training.
    assert len(cached.get_decoder().layers) == 4


def test_check_with_a_refusal_detector_stops_refusals_early_with_the_same_rate():
    import tiny_models
    from abliterate.refusal import RefusalDetector
    from tiny_tokenizer import char_tokenizer

    tokenizer, model = char_tokenizer(), tiny_models.tiny_llama()  # random, non-empty answers
    prompts = [h["prompt"] for h in HARMFUL] + HARMLESS
    # markers the random model is sure to write: the answers' own first characters
    _, full = dm.refusal_rate(model, tokenizer, prompts, SYSTEM, 8, RefusalDetector(["no such marker"]))
    detector = RefusalDetector([a[:2] for a in full[::2] if len(a.strip()) >= 2])
    rate, answers = dm.refusal_rate(model, tokenizer, prompts, SYSTEM, 8, detector)
    assert rate == sum(map(detector.is_refusal, full)) / len(full)
    assert all(f.startswith(a) for a, f in zip(answers, full))
    assert any(len(a) < len(f) for a, f in zip(answers, full))
