"""Editors: LoRA and in-place routes, row-norm modes against float64 references, reset, shape rule."""

from __future__ import annotations

import logging
import math

import pytest
import tiny_models as tm
import torch
from abliterate import io
from abliterate.ablation import (
    AblationParams,
    Kernel,
    RowNorm,
    delta_factors,
    direction_for,
)
from abliterate.architecture import discover
from abliterate.editors import InPlaceEditor, LoraEditor
from abliterate.errors import ConfigError, NumericalError
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

torch.set_num_threads(1)
# PEFT itself calls a deprecated transformers method.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

MODELS = list(tm.FACTORIES)
ALL_ONES = AblationParams.constant(1.0)
# Uneven weights across layers and kinds, an interpolated global direction: exercises kernel and direction maths.
VARIED = AblationParams(
    direction_index=1.5,
    kernels={"attn_out": Kernel(1.3, 1.0, 0.4, 1.5), "mlp_down": Kernel(0.9, 2.0, 0.2, 2.5)},
)


def _directions(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tm.LAYERS + 1, tm.HIDDEN, generator=gen)


def _ablator(name: str, row_norm=RowNorm.NONE, in_place=False, **kwargs):
    model = tm.FACTORIES[name]()
    return (InPlaceEditor if in_place else LoraEditor)(
        model,
        discover(model),
        _directions(),
        row_norm=row_norm,
        **kwargs,
    )


def _logits(ablator) -> torch.Tensor:
    with torch.inference_mode():
        return ablator.model(tm.input_ids()).logits


def _base_views(ablator, c) -> torch.Tensor:
    """The float32 (out, in) base weight(s), straight from the stored parameter or backup."""
    w = ablator._backups.get(c, c.weight).detach().float()
    if c.layout == "conv1d":
        return w.T
    if c.layout == "experts" and c.expert_axis_order == "in_out":
        return w.transpose(1, 2)
    return w


# -- kernel, directions, parameters ---------------------------------------------------------------


def test_kernel_interpolation():
    k = Kernel(max_weight=1.0, max_weight_position=4.0, min_weight=0.2, min_weight_distance=2.0)
    assert k.weight_at(4) == 1.0
    assert k.weight_at(5) == pytest.approx(0.6)
    assert k.weight_at(3) == pytest.approx(0.6)
    assert k.weight_at(6) == pytest.approx(0.2)  # exactly at the distance: min_weight
    assert k.weight_at(6.01) == 0.0 and k.weight_at(1) == 0.0
    frac = Kernel(2.0, 1.5, 0.0, 1.0)
    assert frac.weight_at(1) == pytest.approx(1.0) and frac.weight_at(2) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        Kernel(1.0, 0.0, 1.0, 0.0)


def test_direction_index_is_a_layer_whose_output_gives_the_direction():
    # rows: the embedding output, then the outputs of decoder layers 0, 1 and 2
    d = torch.zeros(4, 4)
    d[0, 3] = 7.0  # the embedding output's row: never a direction
    d[1, 0] = 2.0
    d[2, 1] = 5.0
    d[3, 2] = 1.0
    assert torch.equal(direction_for(d, 0), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(direction_for(d, 2.0), torch.tensor([0, 0, 1.0, 0]))  # the last layer's
    mid = direction_for(d, 0.5)  # lerp (1, 2.5, 0, 0) then renormalise
    expected = torch.tensor([1.0, 2.5, 0, 0]) / math.hypot(1.0, 2.5)
    torch.testing.assert_close(mid, expected)
    quarter = direction_for(d, 1.25)
    torch.testing.assert_close(quarter, torch.tensor([0, 3.75, 0.25, 0]) / math.hypot(3.75, 0.25))
    assert direction_for(d, 1.25).dtype == torch.float32
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):
        direction_for(d, 2.5)
    with pytest.raises(ConfigError):
        direction_for(d, -0.1)
    with pytest.raises(NumericalError):
        direction_for(torch.zeros(2, 4), 0)


def test_params_flat_roundtrip():
    flat = VARIED.to_flat()
    assert flat["direction_index"] == 1.5
    assert flat["attn_out.max_weight"] == 1.3 and flat["mlp_down.min_weight_distance"] == 2.5
    assert all(isinstance(v, float) for v in flat.values())
    assert AblationParams.from_flat(flat) == VARIED
    per_layer = AblationParams(None, VARIED.kernels)
    assert "direction_index" not in per_layer.to_flat()
    assert AblationParams.from_flat(per_layer.to_flat()) == per_layer
    with pytest.raises(ConfigError):
        AblationParams.from_flat({"attn_out.max_weight": 1.0})
    with pytest.raises(ConfigError):
        AblationParams.from_flat({**flat, "attn_out.bogus": 1.0})
    with pytest.raises(ConfigError):
        AblationParams(None, {"embeddings": Kernel(1, 0, 1, 1)})


# -- the edit itself ------------------------------------------------------------------------------


BATCHED = pytest.mark.parametrize("batched", [False, True], ids=["per_component", "batched"])


@BATCHED
@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
@pytest.mark.parametrize("name", MODELS)
def test_full_weight_removes_direction(name, in_place, batched):
    ab = _ablator(name, in_place=in_place, batched=batched)
    before = {c: _base_views(ab, c).clone() for c in ab.layout.components}
    ab.apply(ALL_ONES)
    for c in ab.layout.components:
        r = direction_for(ab.directions, c.layer)
        w_new = ab.effective_weight(c)
        assert w_new.shape == before[c].shape
        proj_before = torch.linalg.vector_norm(torch.matmul(r, before[c]))
        proj_after = torch.linalg.vector_norm(torch.matmul(r, w_new))
        assert proj_after <= 1e-5 * proj_before, (c.name, proj_after.item(), proj_before.item())


@BATCHED
@pytest.mark.parametrize("row_norm", list(RowNorm))
@pytest.mark.parametrize("name", MODELS)
def test_lora_and_direct_routes_agree(name, row_norm, batched):
    lora = _ablator(name, row_norm, batched=batched)
    direct = _ablator(name, row_norm, in_place=True, batched=batched)
    base_logits = _logits(direct)
    base_weights = [c.weight.detach().clone() for c in direct.layout.components]
    assert type(direct) is InPlaceEditor and not direct._lora_layers
    assert lora.peft_model is not None
    for params in (VARIED, ALL_ONES):  # two trials in a row: the second replaces the first
        lora.apply(params)
        direct.apply(params)
        for cl, cd in zip(lora.layout.components, direct.layout.components):
            assert cl.name == cd.name
            torch.testing.assert_close(
                lora.effective_weight(cl), direct.effective_weight(cd), rtol=0, atol=1e-6
            )
        edited = _logits(lora)
        torch.testing.assert_close(edited, _logits(direct), rtol=0, atol=1e-5)
        assert (edited - base_logits).abs().max() > 1e-3  # the edit does change the model
    for ab in (lora, direct):
        ab.reset()
        assert torch.equal(_logits(ab), base_logits)
    for c, w in zip(direct.layout.components, base_weights):
        assert torch.equal(c.weight.detach(), w)
    for c in lora.layout.components:  # LoRA route never touches base weights
        assert torch.equal(lora.effective_weight(c), _base_views(lora, c))


def _reference_delta(
    w: torch.Tensor, r: torch.Tensor, lam: float, row_norm: RowNorm
) -> torch.Tensor:
    """Dense float64 ΔW of the module docstring, with explicit diag matrices (fine at test size)."""
    w, r = w.double(), r.double()
    if row_norm == RowNorm.NONE:
        return -lam * torch.outer(r, r @ w)
    n = w.norm(dim=1)
    w_hat = torch.diag(1 / n) @ w
    if row_norm == RowNorm.PRE:
        return -lam * torch.diag(n) @ torch.outer(r, r @ w_hat)
    p = w_hat - lam * torch.outer(r, r @ w_hat)
    w_new = torch.diag(n) @ torch.diag(1 / p.norm(dim=1)) @ p
    torch.testing.assert_close(w_new.norm(dim=1), n)  # FULL keeps every row norm
    return w_new - w


@BATCHED
@pytest.mark.parametrize("row_norm", list(RowNorm))
@pytest.mark.parametrize("name", ["llama", "moe_fused", "gpt_oss", "gpt2"])
def test_deltas_match_float64_reference(name, row_norm, batched):
    ab = _ablator(name, row_norm, full_rank=3, batched=batched)
    ab.apply(VARIED)
    checked = 0
    for c in ab.layout.components:
        lam = VARIED.kernels[c.kind].weight_at(c.layer)
        base = _base_views(ab, c)
        delta = ab.effective_weight(c).double() - base.double()
        if lam == 0:
            assert torch.equal(delta, torch.zeros_like(delta))
            continue
        r = direction_for(_directions(), VARIED.direction_index)
        bases, deltas = (base, delta) if c.layout == "experts" else (base[None], delta[None])
        for w, d in zip(bases, deltas):
            ref = _reference_delta(w, r, lam, row_norm)
            if row_norm != RowNorm.FULL:
                # float32 factors and weights: measured max error <= 8e-7 of max|ΔW|
                torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-7)
            else:
                # Eckart-Young: the truncated SVD is the best rank-3 approximation. Here σ3/σ4 is only
                # ~1.03-1.1, so the rank-3 subspace is ill-conditioned and an elementwise comparison with
                # it would test luck, not correctness; what is well defined is the approximation error
                # and the singular values. Measured: error/optimum <= 1 + 4e-7, singular values within
                # 5e-6 relative (float32 arithmetic; q = 3 + 8 with 4 power iterations on <= 96-wide
                # matrices is as good as exact). Bounds: 1e-3 and 1e-4, two decades of margin.
                u, s, vh = torch.linalg.svd(ref, full_matrices=False)
                best = (u[:, :3] * s[:3]) @ vh[:3]
                optimal_err = (ref - best).norm()
                assert (ref - d).norm() <= 1.001 * optimal_err + 1e-7 * ref.norm()
                s_got = torch.linalg.svdvals(d)[:3]
                torch.testing.assert_close(s_got, s[:3], rtol=1e-4, atol=1e-8)
                assert torch.linalg.matrix_rank(d, rtol=1e-5) <= 3
            checked += 1
    assert checked >= 2


def test_full_mode_is_seeded_and_deterministic():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    r = torch.nn.functional.normalize(
        torch.randn(64, generator=torch.Generator().manual_seed(4)), dim=0
    )
    state = torch.random.get_rng_state()
    b1, a1 = delta_factors(w, r, 0.8, RowNorm.FULL, rank=2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b2, a2 = delta_factors(w, r, 0.8, RowNorm.FULL, rank=2, seed=7)
    assert torch.equal(b1, b2) and torch.equal(a1, a2)
    assert b1.shape == (64, 2) and a1.shape == (2, 96)
    # sqrt(S) split over both factors: the column norms of B equal the row norms of A
    torch.testing.assert_close(b1.norm(dim=0), a1.norm(dim=1))


@BATCHED
def test_a_layer_without_direction_only_fails_the_trials_that_edit_it(batched):
    """The directions rule writes a zero row where the means coincide: editing other layers works."""
    directions = _directions()
    directions[3] = 0  # the output of layer 2
    model = tm.tiny_llama()
    ab = LoraEditor(model, discover(model), directions, batched=batched)
    ab.apply(AblationParams(None, {"mlp_down": Kernel(1.0, 0.0, 1.0, 1.5)}))  # layers 0 and 1
    assert sorted(c.layer for c in ab._factors) == [0, 1]
    ab.apply(AblationParams(1.0, {"mlp_down": Kernel(1.0, 2.0, 1.0, 0.5)}))  # a global direction
    with pytest.raises(NumericalError, match=r"layer\(s\) \[2\]"):
        ab.apply(AblationParams(None, {"mlp_down": Kernel(1.0, 2.0, 1.0, 0.5)}))


@BATCHED
def test_zero_weight_kind_is_untouched(batched):
    ab = _ablator("llama", batched=batched)
    ab.apply(AblationParams(None, {"attn_out": Kernel(1.0, 0.0, 1.0, 10.0)}))
    for c in ab.layout.components:
        changed = not torch.equal(ab.effective_weight(c), _base_views(ab, c))
        assert changed == (c.kind == "attn_out")


# -- shape rule: no (hidden, hidden) tensor during apply and reset -----------------------------------


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op creates; views and in-place results (which alias an
    input's storage, e.g. ``W.T`` or ``W.addr_``) allocate nothing and are left out."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((str(func), tuple(leaf.shape)))
        return out


def _square(shapes, hidden=tm.HIDDEN):
    return [(op, s) for op, s in shapes if sum(d == hidden for d in s) >= 2]


CASES = [(n, rn, fd) for n in MODELS if n != "gpt2" for rn in RowNorm for fd in (False, True)]
# GPT-2's attn.c_proj is (hidden, hidden) by design, so only the factor-only LoRA route with rank-1
# modes can be checked there (a direct edit or a dense FULL ΔW of that matrix is necessarily square).
CASES += [("gpt2", rn, False) for rn in (RowNorm.NONE, RowNorm.PRE)]


@BATCHED
@pytest.mark.parametrize("name,row_norm,in_place", CASES)
def test_no_hidden_by_hidden_tensor(name, row_norm, in_place, batched):
    ab = _ablator(name, row_norm, in_place=in_place, batched=batched)
    with ShapeRecorder() as rec:
        ab.apply(VARIED)
        ab.apply(ALL_ONES)
        ab.reset()
    assert len(rec.shapes) > 10  # the recorder did see the work
    assert _square(rec.shapes) == []


def test_batched_full_mode_builds_no_dense_delta():
    """The batched full mode reaches ΔW through an operator, so not even GPT-2's square attn.c_proj
    gets a dense (hidden, hidden) ΔW, which the per-component path has to build."""
    ab = _ablator("gpt2", RowNorm.FULL, batched=True)
    with ShapeRecorder() as rec:
        ab.apply(VARIED)
        ab.apply(ALL_ONES)
        ab.reset()
    assert len(rec.shapes) > 10 and _square(rec.shapes) == []


def test_shape_recorder_catches_a_projector():
    r = torch.randn(tm.HIDDEN)
    with ShapeRecorder() as rec:
        torch.outer(r, r)
    assert _square(rec.shapes)


# -- export, logging, inputs ----------------------------------------------------------------------


@BATCHED
def test_save_adapter_roundtrip(tmp_path, batched):
    from peft import PeftModel

    # LoRA on o_proj; direct edits on the fused experts and on the dense down_proj PEFT would re-target
    ab = _ablator("moe_fused", RowNorm.PRE, batched=batched)
    ab.apply(VARIED)
    expected = _logits(ab)
    out = tmp_path / "adapter"
    ab.save(out)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # atomic: no temp folder left
    tensors, meta = io.load_safetensors(out / "direct_edits.safetensors")
    assert meta["row_norm"] == "pre" and meta["params"] == VARIED.to_flat()
    entries = {e["key"]: e for e in meta["direct_edits"]}
    assert set(entries) == {c.key for c in ab.direct_components}

    fresh = tm.tiny_moe_fused()
    with torch.no_grad():
        for key, entry in entries.items():
            b, a = tensors[f"{key}.lora_B"], tensors[f"{key}.lora_A"]
            w = fresh.get_submodule(entry["name"]).get_parameter(entry["param"])
            if entry["layout"] == "experts":
                views = [
                    w[e] if entry["expert_axis_order"] == "out_in" else w[e].T
                    for e in range(w.shape[0])
                ]
                for e, view in enumerate(views):
                    view.add_(b[e] @ a[e])
            else:
                w.add_(b @ a)
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.inference_mode():
        got = loaded(tm.input_ids()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_apply_logs_one_info_line(caplog):
    ab = _ablator("llama")
    with caplog.at_level(logging.INFO, logger="abliterate.editors"):
        ab.apply(VARIED)
    lines = [r for r in caplog.records if r.name == "abliterate.editors"]
    assert len(lines) == 1 and "components" in lines[0].getMessage()


def test_peft_model_input_and_caller_model_see_the_edit():
    from peft import LoraConfig, get_peft_model

    model = tm.tiny_llama()
    with torch.inference_mode():
        base = model(tm.input_ids()).logits
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    ab = LoraEditor(wrapped, discover(wrapped), _directions())
    assert ab.peft_model is wrapped and ab.base is model
    ab.apply(ALL_ONES)
    with torch.inference_mode():
        # get_peft_model edits in place: the caller's own model object computes the edit too
        via_caller = model(tm.input_ids()).logits
    torch.testing.assert_close(via_caller, _logits(ab), rtol=0, atol=0)
    assert (via_caller - base).abs().max() > 1e-3
    ab.reset()
    assert torch.equal(_logits(ab), base)


def test_bad_directions_rejected():
    model = tm.tiny_llama()
    layout = discover(model)
    with pytest.raises(ConfigError):
        LoraEditor(model, layout, torch.randn(tm.LAYERS, tm.HIDDEN))
    with pytest.raises(ConfigError):
        LoraEditor(model, layout, torch.zeros(tm.LAYERS + 1, tm.HIDDEN, dtype=torch.int64))


@pytest.mark.parametrize(
    "route, device, expected",
    [("auto", "cpu", True), ("auto", "cuda", False), ("lora", "cpu", False), ("direct", "cuda", True)],
)
def test_route_choice(route, device, expected):
    from abliterate.editors import direct_route

    model = tm.FACTORIES[MODELS[0]]()
    assert direct_route(route, discover(model), torch.device(device)) is expected


def test_direct_route_on_a_quantized_layout_names_the_key():
    import dataclasses

    from abliterate.editors import direct_route

    layout = discover(tm.FACTORIES[MODELS[0]]())
    layout = dataclasses.replace(layout, components=[dataclasses.replace(c, quantized=True) for c in layout.components])
    assert direct_route("auto", layout, torch.device("cpu")) is False
    with pytest.raises(ConfigError, match="ablation.route"):
        direct_route("direct", layout, torch.device("cpu"))


@pytest.mark.parametrize("route, editor", [("auto", "InPlaceEditor"), ("direct", "InPlaceEditor"), ("lora", "LoraEditor")])
def test_the_factory_chooses_the_editor_once(route, editor):
    from abliterate import editors

    model = tm.FACTORIES[MODELS[0]]()
    chosen = editors.make_editor(model, discover(model), _directions(), route, row_norm="pre", batched=False)
    assert type(chosen).__name__ == editor and chosen.row_norm == RowNorm.PRE and not chosen._groups


def test_per_layer_and_global_directions_mean_the_same_by_a_layer_index():
    ab = _ablator(MODELS[0])
    cpu = torch.device("cpu")
    per_layer = ab._trial_directions(cpu, None, [], {})
    for layer in range(ab.layout.n_layers):
        torch.testing.assert_close(per_layer[layer], direction_for(ab.directions, layer), rtol=0, atol=1e-7)
        assert torch.equal(ab._trial_directions(cpu, float(layer), [], {})[0], direction_for(ab.directions, layer))
    global_mid = ab._trial_directions(cpu, 0.5, [], {})
    assert all(torch.equal(row, direction_for(ab.directions, 0.5)) for row in global_mid)
