"""The batched LoRA edit replayed as a CUDA graph (abliterate.edit_graph) against the eager batched edit."""

from __future__ import annotations

import logging

import pytest
import tiny_models as tm
import torch
from abliterate import edit_graph
from abliterate.ablation import AblationParams, Ablator, Kernel, RowNorm
from abliterate.architecture import discover
from abliterate.errors import AbliterateError

CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs"),
])

TRIALS = [
    AblationParams.constant(1.0, direction_index=0.5),  # every layer, one interpolated direction
    AblationParams(None, {"mlp_down": Kernel(1.2, 1.0, 0.5, 0.9), "attn_out": Kernel(0.8, 2.0, 0.8, 0.5)}),
    AblationParams(None, {"mlp_down": Kernel(0.6, 2.0, 0.6, 3.0)}),  # per-layer again, other kernel
    AblationParams(None, {}),  # nothing edited
    AblationParams(1.5, {"attn_out": Kernel(1.1, 0.0, 0.3, 1.5)}),  # one kind only
]


def _logits(model):
    with torch.inference_mode():
        return model(tm.input_ids().to(model.device)).logits


def _ablator(device, dtype, row_norm, graph: bool, directions):
    model = tm.tiny_qwen3().to(device, dtype)
    ab = Ablator(model, discover(model), directions, row_norm=row_norm, graphs=graph, backup_device=None)
    if graph and device == "cpu":
        # the CPU never records a graph; the Ablator then runs the graph's steps eagerly, which is what
        # this test checks there (every layer computed, λ = 0 outside the kernels)
        ab._graph_groups = [g for g in ab._groups if g.lora]
    return ab


def _trials(ab):
    seen = []
    for params in TRIALS:
        ab.apply(params)
        seen.append(([ab.effective_weight(c) for c in ab.layout.components], _logits(ab.model),
                     sorted((c.kind, c.layer) for c in ab._factors), ab.first_edited_layer))
    ab.reset()
    seen.append(([ab.effective_weight(c) for c in ab.layout.components], _logits(ab.model), [], tm.LAYERS))
    return seen


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("row_norm", [RowNorm.NONE, RowNorm.PRE])
def test_graph_matches_the_eager_batched_edit(row_norm, dtype, device):
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(4))
    eager = _ablator(device, dtype, row_norm, False, directions)
    base = _logits(eager.model)
    want = _trials(eager)
    graphed = _ablator(device, dtype, row_norm, True, directions)
    got = _trials(graphed)
    assert graphed._graph is not None and eager._graph is None
    assert len(graphed._graph.groups) == 2
    for (w0, l0, e0, f0), (w1, l1, e1, f1) in zip(want, got):
        assert (e0, f0) == (e1, f1)
        for x, y in zip(w0, w1):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6 * max(1.0, x.abs().max().item()))
        torch.testing.assert_close(l1, l0, rtol=0, atol=1e-4 if dtype == torch.float32 else 5e-2)
    assert want[3][2] == []  # the empty trial edits nothing
    assert torch.equal(got[-1][1], base)  # reset: the base model again, bit for bit


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("broken", [0.0, float("nan")], ids=["zero", "nan"])
def test_trials_need_no_direction_where_they_edit_nothing(device, broken):
    """A zero or NaN row in the direction table fails only the trials that edit its layer, as eagerly;
    the graph computes that layer with weight 0, which must leave it unedited (0 · NaN is NaN)."""
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(5))
    directions[3] = broken  # layer 2's direction
    ab = _ablator(device, torch.float32, RowNorm.NONE, True, directions)
    base = _logits(ab.model)
    ab.apply(AblationParams(None, {"mlp_down": Kernel(1.0, 0.0, 1.0, 1.5)}))  # layers 0 and 1
    assert sorted(c.layer for c in ab._factors) == [0, 1]
    assert torch.isfinite(_logits(ab.model)).all()
    ab.reset()
    assert torch.equal(_logits(ab.model), base)
    with pytest.raises(Exception, match=r"no direction for layer\(s\) \[2\]"):
        ab.apply(AblationParams(None, {"mlp_down": Kernel(1.0, 2.0, 1.0, 0.5)}))


def test_graph_reasons():
    model = tm.tiny_qwen3()
    ab = Ablator(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN))
    lora = [g for g in ab._groups if g.lora]
    assert edit_graph.graph_reason(lora, "none", False).startswith("turned off")
    assert edit_graph.graph_reason([], "none", True) == "no stacked LoRA groups"
    assert edit_graph.graph_reason(lora, "full", True).startswith("row_norm full")
    assert edit_graph.graph_reason(lora, "pre", True) == "not on CUDA (cpu)"
    ab.apply(AblationParams.constant(1.0))
    assert ab._graph is None


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_moving_the_model_after_recording_is_an_error(device):
    """A graph writes to fixed addresses: after a move it would edit memory the model no longer reads."""
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(7))
    ab = _ablator(device, torch.float32, RowNorm.NONE, True, directions)
    ab.apply(AblationParams.constant(1.0))
    ab.model.to(torch.float64)
    with pytest.raises(AbliterateError, match="moved or replaced"):
        ab.apply(AblationParams.constant(1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA graphs")
def test_full_mode_on_cuda_runs_eagerly_and_says_why(caplog):
    model = tm.tiny_qwen3().to("cuda")
    with caplog.at_level(logging.INFO, logger="abliterate.ablation"):
        ab = Ablator(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN), row_norm="full")
    ab.apply(AblationParams.constant(1.0))
    assert ab._graph is None
    assert any("edit graph: not used, row_norm full" in r.getMessage() for r in caplog.records)
