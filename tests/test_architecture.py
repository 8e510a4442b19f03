"""discover(): decoder layers and residual-writing components of tiny random models."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import tiny_models as tm
import torch
from abliterate.architecture import Component, ModelLayout, discover, unwrap
from abliterate.errors import UnsupportedArchitectureError
from torch import nn

torch.set_num_threads(1)
# PEFT itself calls a deprecated transformers method.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

# name -> (model class, layers prefix, {(kind, layout): count}, expert axis order)
EXPECTED = {
    "llama": (
        "LlamaForCausalLM",
        "model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "linear"): 3},
        None,
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        "model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "linear"): 3},
        None,
    ),
    "gemma3_text": (
        "Gemma3ForCausalLM",
        "model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "linear"): 3},
        None,
    ),
    "moe_fused": (
        "Qwen3MoeForCausalLM",
        "model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "experts"): 2, ("mlp_down", "linear"): 1},
        "out_in",
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        "model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "experts"): 3},
        "in_out",
    ),
    "multimodal": (
        "Gemma3ForConditionalGeneration",
        "model.language_model.layers",
        {("attn_out", "linear"): 3, ("mlp_down", "linear"): 3},
        None,
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "transformer.h",
        {("attn_out", "conv1d"): 3, ("mlp_down", "conv1d"): 3},
        None,
    ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_discover_counts(name):
    model_class, prefix, counts, axis_order = EXPECTED[name]
    model = tm.FACTORIES[name]()
    layout = discover(model)
    assert layout.model_class == model_class
    assert layout.n_layers == tm.LAYERS
    assert layout.hidden_size == tm.HIDDEN
    assert layout.layers_path == prefix
    found: dict = {}
    for c in layout.components:
        found[(c.kind, c.layout)] = found.get((c.kind, c.layout), 0) + 1
        assert c.name.startswith(prefix + f".{c.layer}.")
        assert model.get_submodule(c.name) is c.module
        assert c.out_features == tm.HIDDEN
        assert c.lora == (c.layout != "experts")
        if c.layout == "experts":
            assert c.param == "down_proj" and c.expert_axis_order == axis_order and c.weight.shape[0] == 4
            assert c.weight.ndim == 3
    assert found == counts
    # every layer has exactly one attention output projection
    assert sorted(c.layer for c in layout.components if c.kind == "attn_out") == list(range(tm.LAYERS))


def test_multimodal_only_text_tower():
    layout = discover(tm.tiny_multimodal())
    assert all("vision" not in c.name for c in layout.components)
    assert {c.name.split(".layers.")[0] for c in layout.components} == {"model.language_model"}


def test_fused_experts_not_skipped():
    layout = discover(tm.tiny_moe_fused())
    experts = [c for c in layout.components if c.layout == "experts"]
    assert [c.layer for c in experts] == [0, 2]  # layer 1 is a dense MLP (mlp_only_layers)
    assert all(
        c.name.endswith("mlp.experts") and c.weight.shape == (4, tm.HIDDEN, tm.MOE_INTERMEDIATE)
        for c in experts
    )


def test_gpt2_conv1d_names():
    layout = discover(tm.tiny_gpt2())
    names = [c.name for c in layout.components if c.layer == 0]
    assert names == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]


def test_table_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="abliterate.architecture"):
        layout = discover(tm.tiny_llama())
    line = "LlamaForCausalLM: 3 layers × {attn_out: 3 linear, mlp_down: 3 linear}"
    assert layout.table() == line
    assert line in caplog.text
    moe = discover(tm.tiny_moe_fused()).table()
    assert (
        moe
        == "Qwen3MoeForCausalLM: 3 layers × {attn_out: 3 linear, mlp_down: 1 linear + 2 experts}"
    )


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)


class MLPStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_MLP() for _ in range(3))


def test_unknown_architecture_names_class_and_modules():
    with pytest.raises(UnsupportedArchitectureError) as err:
        discover(MLPStack())
    message = str(err.value)
    assert "MLPStack" in message
    assert "fc1" in message and "fc2" in message


class _OddAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mystery = nn.Linear(8, 8)


class _OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _OddAttention()
        self.feed = nn.Linear(8, 8)


class OddModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8)
        self.layers = nn.ModuleList(_OddBlock() for _ in range(2))


def test_blocks_without_known_projections_raise():
    with pytest.raises(UnsupportedArchitectureError) as err:
        discover(OddModel())
    message = str(err.value)
    assert "OddModel" in message and "self_attn.mystery" in message and "feed" in message


def test_peft_wrapped_input_is_unwrapped():
    from peft import LoraConfig, get_peft_model

    model = tm.tiny_llama()
    plain = [(c.name, c.layout) for c in discover(model).components]
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    assert unwrap(wrapped) is model
    assert unwrap(model) is model
    layout = discover(wrapped)
    assert [(c.name, c.layout) for c in layout.components] == plain
    o_proj = layout.components[0]
    assert isinstance(o_proj.module, nn.Linear)  # the base layer under the LoRA wrapper
    assert o_proj.module is model.get_submodule(o_proj.name).get_base_layer()


def test_component_identity_semantics():
    layout = discover(tm.tiny_llama())
    assert isinstance(layout, ModelLayout)
    a, b = layout.components[:2]
    assert isinstance(a, Component) and a != b and len({a, b}) == 2
