"""Batched edits: stacked weights and batched factor maths give what the per-component path gives."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from abliterate import batched_ablation
from abliterate.ablation import AblationParams, Kernel, RowNorm, delta_factors
from abliterate.architecture import discover
from abliterate.editors import InPlaceEditor, LoraEditor

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def _stack(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers, out, _ = shape
    w = torch.randn(*shape, generator=gen)
    w[0, 2] = 0  # an all-zero row: pre and full must leave it alone, not divide by zero
    r = torch.nn.functional.normalize(torch.randn(layers, out, generator=gen), dim=1)
    lam = torch.tensor([1.0, 0.35, 1.4])[:layers]
    return w, r, lam


@pytest.mark.parametrize("shape", [(3, 16, 40), (3, 40, 16)], ids=["wide", "tall"])
@pytest.mark.parametrize("row_norm", list(RowNorm))
def test_batched_factors_match_delta_factors(row_norm, shape):
    w, r, lam = _stack(shape)
    norms = torch.linalg.vector_norm(w, dim=2)
    b, a = batched_ablation.batched_factors(w, r, lam, row_norm.value, norms=norms, rank=3, seed=5)
    k = 3 if row_norm == RowNorm.FULL else 1
    assert b.shape == (3, shape[1], k) and a.shape == (3, k, shape[2])
    for layer in range(3):
        rb, ra = delta_factors(w[layer], r[layer], float(lam[layer]), row_norm, rank=3, seed=5)
        got, want = b[layer] @ a[layer], rb @ ra
        # full: the same seeded start and power iterations on the same matrix, reached through an
        # operator instead of a dense ΔW; measured <= 3e-7 of ‖ΔW‖
        assert (got - want).norm() <= 1e-5 * want.norm(), (layer, (got - want).norm() / want.norm())
        if layer == 0 and row_norm != RowNorm.NONE:  # a zero row of W stays zero (full: up to rounding)
            assert got[2].abs().max() <= 1e-6 * want.abs().max()


def test_orthonormal_basis_spans_its_input_and_survives_a_zero_matrix():
    gen = torch.Generator().manual_seed(4)
    # columns scaled over four decades: what power iterations hand over
    x = torch.randn(3, 50, 6, generator=gen) * torch.logspace(0, -4, 6)
    x[2] = 0
    q = batched_ablation.orthonormal_basis(x)
    eye = torch.eye(6)
    for layer in (0, 1):
        torch.testing.assert_close(q[layer].mT @ q[layer], eye, rtol=0, atol=1e-6)
        # the same span: projecting x onto the basis gives x back
        torch.testing.assert_close(q[layer] @ (q[layer].mT @ x[layer]), x[layer], rtol=0, atol=1e-6)
    assert torch.equal(q[2], torch.zeros_like(q[2]))


def test_full_mode_with_a_zero_weight_inside_the_kernel():
    """max_weight 0 with min_weight > 0: a layer with λ = 0 between edited ones (its ΔW is zero)."""
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(5))
    params = AblationParams(None, {"mlp_down": Kernel(0.0, 1.0, 0.8, 1.0)})
    seen = []
    for batched in (False, True):
        model = tm.tiny_llama()
        ab = LoraEditor(model, discover(model), directions, row_norm=RowNorm.FULL, batched=batched)
        ab.apply(params)
        seen.append([ab.effective_weight(c) for c in ab.layout.components])
        assert sorted(c.layer for c in ab._factors) == [0, 2]
    for x, y in zip(*seen):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_split_products_keep_float32_precision(monkeypatch):
    """The hi/lo split against a bfloat16 weight: float32 quality from one read of the weight.

    CPUs have no ``bmm(..., out_dtype=float32)``; it is emulated by exact float32 products of the
    bfloat16 operands, which is what float32 accumulation computes."""
    monkeypatch.setattr(batched_ablation, "_low_precision_bmm", lambda a, b: torch.bmm(a.float(), b.float()))
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 48, 80, generator=gen).bfloat16()
    x = torch.randn(2, 3, 48, generator=gen)
    y = torch.randn(2, 80, 4, generator=gen)
    ref_left = x.double() @ w.double()
    ref_right = w.double() @ y.double()
    for got, ref, naive in (
        (batched_ablation.left_product(x, w, split=True), ref_left, x.bfloat16().double() @ w.double()),
        (batched_ablation.right_product(w, y, split=True), ref_right, w.double() @ y.bfloat16().double()),
    ):
        assert got.dtype == torch.float32
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-5, err  # 2^-17 per operand element, measured ~4e-6
        assert ((naive - ref).norm() / ref.norm()).item() > 10 * err  # rounding x to bfloat16 would not do
    unsplit = batched_ablation.left_product(x, w, split=False)
    torch.testing.assert_close(unsplit.double(), ref_left, rtol=1e-5, atol=1e-5)


def test_split_needs_cuda_and_bfloat16():
    assert not batched_ablation.split_products_supported("cpu", torch.bfloat16)
    assert not batched_ablation.split_products_supported("cuda", torch.float16)


def _logits(model):
    with torch.inference_mode():
        return model(tm.input_ids()).logits


def test_stacking_keeps_the_model_and_shares_one_tensor():
    model = tm.tiny_llama()
    before = _logits(model)
    ab = LoraEditor(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN), batched=True)
    assert torch.equal(_logits(ab.model), before)
    assert {g.components[0].kind for g in ab._groups} == {"attn_out", "mlp_down"}
    for group in ab._groups:
        assert [c.layer for c in group.components] == list(range(tm.LAYERS))
        base = group.stored.untyped_storage().data_ptr()
        for i, c in enumerate(group.components):
            assert c.weight.untyped_storage().data_ptr() == base
            assert torch.equal(c.weight.detach(), group.stored[i])


def test_batched_is_the_default_and_can_be_turned_off():
    model = tm.tiny_llama()
    assert len(LoraEditor(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN))._groups) == 2
    model = tm.tiny_llama()
    assert LoraEditor(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN), batched=False)._groups == []


@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
@pytest.mark.parametrize("row_norm", list(RowNorm))
def test_partial_kernel_support_and_trial_after_trial(row_norm, in_place):
    """Only the layers a kernel reaches are edited; a narrower trial after a wider one leaves nothing behind."""
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(2))
    middle = AblationParams(None, {"mlp_down": Kernel(1.2, 1.0, 0.5, 0.9), "attn_out": Kernel(0.8, 2.0, 0.8, 0.5)})
    wide = AblationParams.constant(1.0, direction_index=0.5)
    runs = []
    for batched in (False, True):
        model = tm.tiny_qwen3()
        ab = (InPlaceEditor if in_place else LoraEditor)(model, discover(model), directions, row_norm=row_norm,
                     batched=batched)
        seen = []
        for params in (wide, middle):
            ab.apply(params)
            seen.append(([ab.effective_weight(c) for c in ab.layout.components], _logits(ab.model),
                         sorted((c.kind, c.layer) for c in ab._factors)))
        ab.reset()
        seen.append(([ab.effective_weight(c) for c in ab.layout.components], _logits(ab.model), []))
        runs.append(seen)
    for (w0, l0, e0), (w1, l1, e1) in zip(*runs):
        assert e0 == e1
        for x, y in zip(w0, w1):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        torch.testing.assert_close(l0, l1, rtol=0, atol=1e-5)
    assert runs[1][1][2] == [("attn_out", 2), ("mlp_down", 1)]
    assert torch.equal(runs[1][2][1], runs[0][2][1])  # reset: the base model again, bit for bit


CUDA = pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bfloat16 products with a float32 out_dtype"),
])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
@pytest.mark.parametrize("row_norm", list(RowNorm))
def test_batched_matches_per_component_in_bfloat16(row_norm, in_place, device):
    """On CUDA the split product; on the CPU the weight cast per product."""
    assert batched_ablation.split_products_supported(device, torch.bfloat16) == (device == "cuda")
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(3))
    params = AblationParams(0.7, {"attn_out": Kernel(1.3, 1.0, 0.4, 1.5), "mlp_down": Kernel(0.9, 2.0, 0.2, 2.5)})
    runs = []
    for batched in (True, False):
        model = tm.tiny_qwen3().to(device, torch.bfloat16)
        ab = (InPlaceEditor if in_place else LoraEditor)(model, discover(model), directions, row_norm=row_norm,
                     batched=batched, backup_device=None)
        assert bool(ab._groups) == batched
        base = [ab.effective_weight(c) for c in ab.layout.components]
        ab.apply(params)
        runs.append([(ab.effective_weight(c) - b, b) for c, b in zip(ab.layout.components, base)])
        ab.reset()
        assert all(torch.equal(ab.effective_weight(c), b) for c, b in zip(ab.layout.components, base))
    for (got, base), (want, _) in zip(*runs):
        assert want.abs().max() > 0
        if in_place:
            # W + BA rounded to bfloat16 once (baddbmm_) or after a bfloat16 outer product (addr_): the
            # two may differ by a unit in the last place of either term
            assert ((got - want).abs() <= 2**-7 * (base.abs() + want.abs()) + 1e-6).all()
        else:  # float32 factors: the split product keeps float32 precision
            assert (got - want).norm() <= 1e-4 * want.norm() + 1e-7


def test_no_stacking_without_memory_for_it(monkeypatch, caplog):
    """Stacking briefly holds a kind's matrices twice: where that does not fit, the loop edits them."""
    from abliterate import devices

    monkeypatch.setattr(devices, "free_bytes", lambda device: 1000)
    directions = torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=torch.Generator().manual_seed(6))
    model = tm.tiny_llama()
    with caplog.at_level("WARNING", logger="abliterate.batched_ablation"):
        ab = LoraEditor(model, discover(model), directions)
    assert ab._groups == []
    assert sum("not stacked" in r.getMessage() for r in caplog.records) == 2
    ab.apply(AblationParams.constant(1.0))
    reference = tm.tiny_llama()
    ref = LoraEditor(reference, discover(reference), directions, batched=False)
    ref.apply(AblationParams.constant(1.0))
    torch.testing.assert_close(_logits(ab.model), _logits(ref.model), rtol=0, atol=0)


def test_free_bytes_knows_the_cpu():
    from abliterate import devices

    assert devices.free_bytes(torch.device("cpu")) > 0


def test_moving_the_model_after_stacking_is_an_error():
    """Stacked edits on weights the model no longer reads would score every trial as the base model."""
    from abliterate.errors import AbliterateError

    model = tm.tiny_llama()
    ab = LoraEditor(model, discover(model), torch.randn(tm.LAYERS + 1, tm.HIDDEN))
    model.to(torch.float64)  # a new tensor per parameter, as a move to another device makes
    with pytest.raises(AbliterateError, match="moved or replaced"):
        ab.apply(AblationParams.constant(1.0))
