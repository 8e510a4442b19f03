"""Fixed-shape decoding (the CUDA-graph path): same tokens as the continuous-batching path.

On the CPU the fixed-shape step runs eagerly, so its cache slots, mask columns and positions are
checked here; the CUDA tests replay it as a graph.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from abliterate import generation, hf_compat, prompting
from abliterate.evaluation import Evaluator
from abliterate.generation import RefusalLimitReached, generate_ids
from abliterate.kl import first_token_logprobs
from generation_helpers import PROMPTS, StopAfter
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _fixed(monkeypatch):
    """Send every generation down the fixed-shape path, whatever the device."""
    monkeypatch.setattr(generation, "cuda_graph_reason", lambda model: None)


def _model(factory: str, attention: str):
    model = tiny_models.FACTORIES[factory]() if factory != "llama" else tiny_models.tiny_llama()
    model.config._attn_implementation = attention
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("factory", ["llama", "qwen3", "moe_fused"])
@pytest.mark.parametrize("system_prompt", [None, "Be brief."])  # with and without a shared prefix
def test_fixed_shapes_give_the_continuous_tokens(factory, attention, system_prompt, tokenizer, monkeypatch):
    model = _model(factory, attention)
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt=system_prompt)
    expected = generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=3)
    _fixed(monkeypatch)
    assert generate_ids(model, tokenizer, texts, max_new_tokens=12, batch_size=3) == expected
    assert generate_ids(model, tokenizer, texts, max_new_tokens=1, batch_size=8) == [e[:1] for e in expected]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_fixed_shapes_on_gpt2(attention, tokenizer, monkeypatch):
    # learned absolute positions, Conv1D layers; its position table (32) only fits short prompts
    model = _model("gpt2", attention)
    texts = prompting.chat_texts(tokenizer, ["Hi", "2+2?", "ok", "Name a color."], system_prompt=None)
    expected = generate_ids(model, tokenizer, texts, max_new_tokens=8, batch_size=3)
    _fixed(monkeypatch)
    assert generate_ids(model, tokenizer, texts, max_new_tokens=8, batch_size=3) == expected


def test_fixed_shapes_stop_rows_early_and_count_refusals(tokenizer, monkeypatch):
    model = _model("llama", "sdpa")
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt=None)
    full = generate_ids(model, tokenizer, texts, max_new_tokens=16, batch_size=4)
    decoded = tokenizer.batch_decode(full, skip_special_tokens=True)
    detector = StopAfter([decoded[2][3:5], decoded[4][1:3]])
    expected = generate_ids(model, tokenizer, texts, 16, 4, detector)
    assert sum(len(e) < len(f) for e, f in zip(expected, full)) >= 2
    _fixed(monkeypatch)
    assert generate_ids(model, tokenizer, texts, 16, 4, detector) == expected
    with pytest.raises(RefusalLimitReached):
        generate_ids(model, tokenizer, texts, 16, 4, detector, max_refusals=1)


def test_evaluator_with_recorded_prefills_scores_the_same(tokenizer, monkeypatch):
    # trials prefill from their first edited layer (leading_layers): the fixed path takes that cache too
    model = _model("qwen3", "sdpa")
    harmful = prompting.chat_texts(tokenizer, PROMPTS[:4], system_prompt="Be brief.")
    harmless = prompting.chat_texts(tokenizer, PROMPTS[4:], system_prompt="Be brief.")
    base = first_token_logprobs(model, tokenizer, harmless, 4)
    evaluator = Evaluator(model, tokenizer, harmful, harmless, base, 10, 4, reuse_layers=True)
    with monkeypatch.context() as m:  # the evaluator chooses its decoder once, when it is built
        _fixed(m)
        fixed = Evaluator(model, tokenizer, harmful, harmless, base, 10, 4, reuse_layers=True)
    assert isinstance(evaluator.decoder, generation.ContinuousDecoder)
    assert isinstance(fixed.decoder, generation.FixedShapeDecoder)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    expected = evaluator.score(first_edited=2), evaluator.responses()
    got = fixed.score(first_edited=2), fixed.responses()
    assert got[1] == expected[1]
    assert got[0]["refusals"] == expected[0]["refusals"] and got[0]["kl"] == pytest.approx(expected[0]["kl"])


def test_reasons_to_decode_without_graphs():
    assert generation.cuda_graph_reason(_model("llama", "sdpa")) == "not on a CUDA device"
    assert "sliding-window" in generation.cuda_graph_reason(tiny_models.FACTORIES["gemma3_text"]())
    assert "flash" in generation.cuda_graph_reason(_model("llama", "flash_attention_2"))
    split = _model("llama", "sdpa")
    split.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    assert "several devices" in generation.cuda_graph_reason(split)
    quantized = _model("llama", "sdpa")
    quantized.is_loaded_in_8bit = True
    assert "bitsandbytes 8-bit" in generation.cuda_graph_reason(quantized)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cuda_graph_replay_matches_eager_decoding(attention, tokenizer):
    model = _model("llama", attention).cuda()
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")
    assert generation.cuda_graph_reason(model) is None
    eager = generate_ids(model, tokenizer, texts, 12, 3, cuda_graphs=False)
    assert generate_ids(model, tokenizer, texts, 12, 3) == eager
    # weights edited in place and a weight replaced between calls: each call captures afresh
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
        layer = model.model.layers[0].self_attn.o_proj
        layer.weight = torch.nn.Parameter(layer.weight * 2.0)
    edited = generate_ids(model, tokenizer, texts, 12, 3, cuda_graphs=False)
    assert edited != eager
    assert generate_ids(model, tokenizer, texts, 12, 3) == edited


def test_a_peft_model_is_generated_through_the_model_under_it(tokenizer):
    # PeftModel.forward takes neither position_ids nor logits_to_keep: calling it directly lost
    # prefix sharing, last-position logits and the fixed-shape path on the LoRA route
    from abliterate.ablation import AblationParams
    from abliterate.architecture import discover
    from abliterate.editors import LoraEditor

    model = _model("qwen3", "sdpa")
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")
    base = generate_ids(model, tokenizer, texts, 8, 4)
    layout = discover(model)
    directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=1)
    ablator = LoraEditor(model, layout, directions)
    ablator.apply(AblationParams.constant(0.8))
    assert ablator.peft_model is not None and not hf_compat.accepts_position_ids(ablator.model)
    assert generation.cuda_graph_reason(generation.unwrap(ablator.model)) == "not on a CUDA device"
    with torch.inference_mode():
        reference = [ablator.model.generate(**prompting.encode(tokenizer, [t], "cpu"), do_sample=False,
                                            max_new_tokens=8, pad_token_id=0)[0, -8:].tolist() for t in texts]
    ours = generate_ids(ablator.model, tokenizer, texts, 8, 4)
    assert [o[:len(r)] for o, r in zip(ours, reference)] == [r[:len(o)] for o, r in zip(ours, reference)]
    assert ours == generate_ids(generation.unwrap(ablator.model), tokenizer, texts, 8, 4) != base


def test_a_failed_capture_falls_back_but_out_of_memory_propagates(tokenizer, monkeypatch):
    from abliterate import fixed_decoding

    model = _model("llama", "sdpa")
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt=None)
    expected = generate_ids(model, tokenizer, texts, 6, 4)
    real_init = fixed_decoding.FixedShapeBatch.__init__
    failure = {}

    def init(self, *args):
        *rest, graph = args
        if graph:  # stands in for a capture that fails on a GPU
            raise failure["error"]
        real_init(self, *rest, graph)

    monkeypatch.setattr(fixed_decoding.FixedShapeBatch, "__init__", init)
    decoder = generation.FixedShapeDecoder(model, tokenizer, 4, graph=True)

    failure["error"] = torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the batch-size probe must see it
        decoder.generate(texts, 6)
    assert model not in generation._GRAPH_FAILED and decoder.graph
    failure["error"] = RuntimeError("operation not permitted when stream is capturing")
    assert decoder.generate(texts, 6) == expected
    assert model in generation._GRAPH_FAILED and decoder.fallback is not None
    batches = []
    monkeypatch.setattr(fixed_decoding.FixedShapeBatch, "__init__", lambda *a: batches.append(a))
    assert decoder.generate(texts, 6) == expected and not batches  # later calls: continuous batching
    assert generation.cuda_graph_reason(model) == "an earlier capture failed"
