"""The output layer screened in bfloat16: the float32 product's greedy tokens, whatever the CPU."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from abliterate import greedy_head, prompting
from abliterate.generation import ContinuousDecoder
from generation_helpers import PROMPTS
from tiny_tokenizer import char_tokenizer
from torch import nn

torch.set_num_threads(1)


def _layer(vocab: int = 500, hidden: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(hidden, vocab, bias=False)
    return layer


def test_tokens_are_the_float32_argmax():
    layer = _layer()
    hidden = torch.randn(40, 64) * 10
    head = greedy_head.ScreenedHead(layer)
    assert torch.equal(head.tokens(hidden), (hidden @ layer.weight.T).argmax(-1))
    assert head.candidates < head.rows * layer.weight.shape[0] / 10  # it screened something out


def test_a_near_tie_bfloat16_cannot_see_is_decided_in_float32():
    """Two vocabulary rows 1e-4 apart, far below bfloat16's resolution: the float32 winner is taken."""
    layer = _layer()
    hidden = torch.randn(8, 64)
    with torch.no_grad():
        layer.weight[7] = hidden[0] / hidden[0].norm() * 3
        layer.weight[3] = layer.weight[7] * (1 - 1e-4)  # the lower id, slightly smaller
    expected = (hidden @ layer.weight.T).argmax(-1)
    assert expected[0] == 7
    assert torch.equal(greedy_head.ScreenedHead(layer).tokens(hidden), expected)


def test_an_edited_weight_is_screened_again():
    layer = _layer()
    hidden = torch.randn(4, 64)
    head = greedy_head.ScreenedHead(layer)
    head.tokens(hidden)
    with torch.no_grad():
        layer.weight[11] = hidden[0] * 100  # row 0's winner now
    assert head.tokens(hidden)[0] == 11
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # replaced, not edited
    assert torch.equal(head.tokens(hidden), (hidden @ layer.weight.T).argmax(-1))


def test_only_a_float32_layer_without_bias():
    with pytest.raises(ValueError, match="without bias"):
        greedy_head.ScreenedHead(nn.Linear(8, 16, bias=True))
    with pytest.raises(ValueError, match="float32"):
        greedy_head.ScreenedHead(nn.Linear(8, 16, bias=False).to(torch.bfloat16))


def test_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    assert greedy_head.cpu_has_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 sse\n")
    assert not greedy_head.cpu_has_bf16(info)
    assert not greedy_head.cpu_has_bf16(tmp_path / "absent")


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(greedy_head, "cpu_has_bf16", lambda: True)


def test_screened_decoding_gives_the_full_products_tokens(bf16_cpu):
    tokenizer = char_tokenizer()
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt=None)
    model = tiny_models.tiny_llama()
    head = greedy_head.screened_head(model)
    assert head is not None
    screened = ContinuousDecoder(model, tokenizer, 3).generate(texts, 12)
    assert head.rows > 0
    greedy_head.set_screening(model, False)
    assert greedy_head.screened_head(model) is None
    full = ContinuousDecoder(model, tokenizer, 3).generate(texts, 12)
    assert screened == full
    greedy_head.set_screening(model, True)
    assert greedy_head.screened_head(model) is not None


def test_a_model_whose_logits_are_not_the_products_keeps_the_full_product(bf16_cpu, caplog):
    model = tiny_models.tiny_llama()
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: -out)
    with caplog.at_level("INFO", logger="abliterate.greedy_head"):
        assert greedy_head.screened_head(model) is None
    assert "full output product" in caplog.text


def test_no_screening_without_bfloat16_instructions(monkeypatch):
    monkeypatch.setattr(greedy_head, "cpu_has_bf16", lambda: False)
    assert greedy_head.screened_head(tiny_models.tiny_llama()) is None


def test_a_decoder_that_fails_alone_keeps_the_full_product(bf16_cpu, monkeypatch, caplog):
    model = tiny_models.tiny_llama()

    def broken(*args, **kwargs):
        raise TypeError("this decoder wants other arguments")

    monkeypatch.setattr(model, "get_decoder", lambda: broken)
    with caplog.at_level("INFO", logger="abliterate.greedy_head"):
        assert greedy_head.screened_head(model) is None
    assert "failed on a probe" in caplog.text
