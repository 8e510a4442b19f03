"""bitsandbytes 4/8-bit: ablate → evaluate → reset on the GPU, then merge on the CPU. Needs CUDA."""

from __future__ import annotations

import pytest
import torch
from abliterate import (
    ablation,
    architecture,
    editors,
    generation,
    kl,
    loading,
    merging,
    prompting,
    refusal,
)
from conftest import needs_cuda
from tiny_tokenizer import tiny_model_dir

pytestmark = [needs_cuda, pytest.mark.gpu]

PARAMS = ablation.AblationParams.constant(1.0, direction_index=1.5)


@pytest.mark.parametrize("mode", ["bnb_4bit", "bnb_8bit"])
def test_quantized_cycle_and_cpu_merge(tmp_path, mode, caplog):
    pytest.importorskip("bitsandbytes", reason="pip install -e '.[quant]'")
    import logging

    caplog.set_level(logging.INFO)
    base_dir = tiny_model_dir(tmp_path / "base", layers=4)
    source = loading.ModelSource(path=str(base_dir))
    lm = loading.load_model(source, torch.device("cuda"), cascade=["bfloat16", "float32"], quant=mode)
    assert ("4-bit" if mode == "bnb_4bit" else "8-bit") in caplog.text and "compute dtype" in caplog.text
    layout = architecture.discover(lm.model)
    assert all(c.quantized and c.lora for c in layout.components)
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=-1)
    ablator = editors.LoraEditor(lm.model, layout, directions)
    texts = prompting.chat_texts(lm.tokenizer, ["Say hello.", "Name a colour.", "Count to three."])
    before = kl.first_token_logprobs(ablator.model, lm.tokenizer, texts, 3)

    ablator.apply(PARAMS)
    after = kl.first_token_logprobs(ablator.model, lm.tokenizer, texts, 3)
    assert kl.kl_divergence(before, after) > 0
    answers = generation.generate(ablator.model, lm.tokenizer, texts, 8, 3, refusal.RefusalDetector())
    assert len(answers) == 3
    ablator.save(tmp_path / "adapter")
    ablator.reset()
    torch.testing.assert_close(kl.first_token_logprobs(ablator.model, lm.tokenizer, texts, 3), before)

    info = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "merged"), max_ram_gib=8,
                         metadata={}, card="")
    assert info["dtype"] == "float32"  # merged unquantized, on the CPU
    merged = loading.load_model(loading.ModelSource(path=str(tmp_path / "merged")), torch.device("cpu"))
    merged_lp = kl.first_token_logprobs(merged.model, merged.tokenizer, texts, 3).to(after.device)
    # The adapter was computed from dequantised weights: merged and quantized-ablated differ only by
    # the quantization error of the base weights.
    assert kl.kl_divergence(after.float(), merged_lp) < 0.05


@pytest.mark.parametrize("mode", ["bnb_4bit", "bnb_8bit"])
def test_cuda_graph_decoding_in_bitsandbytes(tmp_path, mode, caplog, monkeypatch):
    """Fixed-shape decoding replayed as CUDA graphs writes the tokens the same steps write eagerly,
    through quantized layers and a LoRA adapter. 4-bit models decode with graphs by default; 8-bit
    ones are forced here: on an H200 their capture failed and the fallback wrote the same tokens (if a
    bitsandbytes release makes it work, the printed line says so and cuda_graph_reason can allow them)."""
    pytest.importorskip("bitsandbytes", reason="pip install -e '.[quant]'")
    import logging

    caplog.set_level(logging.INFO)
    lm = loading.load_model(loading.ModelSource(path=str(tiny_model_dir(tmp_path / "base", layers=4))),
                            torch.device("cuda"), cascade=["bfloat16"], quant=mode)
    reason = generation.cuda_graph_reason(lm.model)
    assert (reason is None) == (mode == "bnb_4bit")
    if reason is not None:
        monkeypatch.setattr(generation, "cuda_graph_reason", lambda model: None)
    layout = architecture.discover(lm.model)
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=-1)
    ablator = editors.LoraEditor(lm.model, layout, directions)
    texts = prompting.chat_texts(lm.tokenizer, ["Say hello.", "Name a colour.", "Count to three.", "Why?"])
    for params in (None, ablation.AblationParams.constant(0.7, direction_index=1.5)):
        if params is not None:
            ablator.apply(params)
        caplog.clear()
        graphed = generation.generate_ids(ablator.model, lm.tokenizer, texts, 10, 4)
        failed = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
        decoder = generation.FixedShapeDecoder(architecture.unwrap(ablator.model), lm.tokenizer, 4, graph=False)
        eager = decoder.generate(texts, 10)  # the same fixed-shape steps, run eagerly
        print(mode, "edited" if params else "base", "capture failed:" if failed else "graph replayed", failed)
        assert graphed == eager
        if mode == "bnb_4bit":
            assert not failed
