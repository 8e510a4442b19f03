"""CPU merge: adapter + direct edits into a saved model that reproduces the ablated logits."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from abliterate import ablation, architecture, editors, loading, merging
from abliterate.errors import AbliterateError, ConfigError
from abliterate.steps import evaluate
from tiny_tokenizer import tiny_tokenizer
from transformers import AutoModelForCausalLM

PARAMS = ablation.AblationParams(
    direction_index=1.3,
    kernels={
        "attn_out": ablation.Kernel(1.2, 1.0, 0.3, 1.5),
        "mlp_down": ablation.Kernel(0.9, 2.0, 0.1, 2.0),
    },
)


def two_directions(layout):
    """A table and its (n_layers + 1, 2, hidden) orthonormal sets, for k = 2 edits."""
    torch.manual_seed(1)
    sets = torch.linalg.qr(torch.randn(layout.n_layers + 1, layout.hidden_size, 2))[0].mT.contiguous()
    return sets[:, 0].clone(), sets


PARAMS_K2 = ablation.AblationParams(PARAMS.direction_index, PARAMS.kernels, n_directions=2, secondary_weight=0.7)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("factory", ["tiny_llama", "tiny_moe_fused", "tiny_gpt2"])
def test_merged_model_reproduces_the_ablated_model(tmp_path, factory, k):
    base_dir = tmp_path / "base"
    model = getattr(tm, factory)()
    model.save_pretrained(base_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(base_dir)
    layout = architecture.discover(model)
    if k == 1:
        torch.manual_seed(1)
        directions = torch.nn.functional.normalize(torch.randn(layout.n_layers + 1, layout.hidden_size), dim=-1)
        ablator = editors.LoraEditor(model, layout, directions)
        ablator.apply(PARAMS)
    else:  # the adapter's rank covers both directions; fused experts get rank-k direct edits
        directions, sets = two_directions(layout)
        ablator = editors.LoraEditor(model, layout, directions, direction_sets=sets, n_directions=2)
        ablator.apply(PARAMS_K2)
    ids = tm.input_ids()
    with torch.inference_mode():
        expected = ablator.model(ids).logits
    ablator.save(tmp_path / "adapter")

    info = merging.merge(loading.ModelSource(path=str(base_dir)), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                         max_ram_gib=4, metadata={"test": True}, card="# card\n")
    assert info["estimated_ram_bytes"] > 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.inference_mode():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert (tmp_path / "merged" / "README.md").read_text() == "# card\n"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # atomic: no temp folders left

    # merge.adapter_only: the base model with the adapter loaded (LoRA through PEFT, the rest as direct
    # edits), unmerged, gives the same model.
    def base(quantization: str = "none") -> loading.LoadedModel:
        return loading.LoadedModel(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tok, torch.float32,
                                   quantization, source=None, seconds=0.0)

    with_adapter = evaluate.with_adapter(base(), str(tmp_path / "adapter"))
    with torch.inference_mode():
        torch.testing.assert_close(with_adapter.model(ids).logits, expected, rtol=0, atol=1e-4)
    if (tmp_path / "adapter" / ablation.DIRECT_EDITS_FILE).exists():
        with pytest.raises(ConfigError, match="merge.adapter_only: false"):
            evaluate.with_adapter(base("bnb_4bit"), str(tmp_path / "adapter"))


def test_merged_tokenizer_keeps_the_configured_chat_template(tmp_path):
    """A tokenizer without a template (a base model) gets model.chat_template; the merged folder keeps
    it, so the merged model is prompted as the study prompted it."""
    base_dir = tmp_path / "base"
    model = tm.tiny_llama()
    model.save_pretrained(base_dir)
    tok = tiny_tokenizer(None)
    tok.save_pretrained(base_dir)
    ablator = editors.LoraEditor(model, architecture.discover(model),
                               torch.nn.functional.normalize(torch.randn(tm.LAYERS + 1, tm.HIDDEN), dim=-1))
    ablator.apply(PARAMS)
    ablator.save(tmp_path / "adapter")
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    merging.merge(loading.ModelSource(path=str(base_dir)), str(tmp_path / "adapter"), str(tmp_path / "merged"),
                  max_ram_gib=4, metadata={}, card="", chat_template=template)
    assert loading.load_tokenizer(loading.ModelSource(path=str(tmp_path / "merged"))).chat_template == template


def test_merge_stops_before_loading_when_over_budget(tmp_path):
    base_dir = tmp_path / "base"
    tm.tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    with pytest.raises(AbliterateError, match=r"merge\.max_ram_gib"):
        merging.merge(loading.ModelSource(path=str(base_dir)), str(tmp_path / "adapter"), str(tmp_path / "out"),
                      max_ram_gib=1e-6, metadata={}, card="")
    assert not (tmp_path / "out").exists()


def test_merge_dtype_casts_the_merged_float32_weights_once(tmp_path):
    """merge.dtype bfloat16: every saved weight is the float32 merge rounded once, not a bfloat16 merge."""
    from safetensors import safe_open

    base_dir = tmp_path / "base"
    model = tm.tiny_llama()
    model.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    ablator = editors.LoraEditor(model, architecture.discover(model),
                               torch.nn.functional.normalize(torch.randn(tm.LAYERS + 1, tm.HIDDEN), dim=-1))
    ablator.apply(PARAMS)
    ablator.save(tmp_path / "adapter")
    source = loading.ModelSource(path=str(base_dir))
    full = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "f32"), max_ram_gib=4, metadata={}, card="")
    half = merging.merge(source, str(tmp_path / "adapter"), str(tmp_path / "bf16"), max_ram_gib=4, metadata={},
                         card="", save_dtype=torch.bfloat16)
    assert (full["saved_dtype"], half["dtype"], half["saved_dtype"]) == ("float32", "float32", "bfloat16")
    with safe_open(tmp_path / "f32" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as b:
        names = sorted(a.keys())
        assert names == sorted(b.keys())
        for key in names:
            assert b.get_tensor(key).dtype == torch.bfloat16
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key).to(torch.bfloat16), rtol=0, atol=0)
    assert merging.merge_dtype(loading.load_config(loading.ModelSource(path=str(tmp_path / "bf16")))) == torch.bfloat16
