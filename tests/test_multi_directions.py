"""Several refusal directions per layer (issue 26) and switching a component kind off.

Direction sets from the directions rule, k-direction edits on both routes and both paths (k = 1 bit
for bit what the single-direction code gives), the study's space, and the bad-input errors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import tiny_models as tm
import torch
import yaml
from abliterate import batched_ablation, directions, io, study
from abliterate import workflow_config as wc
from abliterate.ablation import (
    AblationParams,
    Kernel,
    RowNorm,
    delta_factors,
    direction_for,
    directions_for,
    source_weight,
    views,
)
from abliterate.architecture import discover
from abliterate.editors import InPlaceEditor, LoraEditor
from abliterate.errors import ConfigError
from study_space import default_space

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
N, LAYERS, HIDDEN = 120, 4, 32
KERNELS = {"attn_out": Kernel(1.3, 1.0, 0.4, 1.5), "mlp_down": Kernel(0.9, 2.0, 0.2, 2.5)}


def planted(seed=0):
    """Harmful = harmless + 3·r1 + g·2·r2 (g a per-prompt ±1), layer 0 identical in both."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(HIDDEN, 2, generator=gen))[0].T
    shared = 5.0 * torch.randn(LAYERS, HIDDEN, generator=gen)
    harmless = shared + 0.3 * torch.randn(N, LAYERS, HIDDEN, generator=gen)
    sign = torch.randint(0, 2, (N, 1, 1), generator=gen) * 2.0 - 1.0
    harmful = shared + 0.3 * torch.randn(N, LAYERS, HIDDEN, generator=gen) + 3.0 * basis[0] + 2.0 * sign * basis[1]
    harmful[:, 0] = harmless[:, 0] = shared[0]
    return harmful, harmless, basis


@pytest.mark.parametrize("options", [{}, {"orthogonalize": True}, {"winsorize_quantile": 0.99}],
                         ids=["plain", "orthogonalize", "winsorize"])
def test_direction_sets_extend_todays_direction(options):
    harmful, harmless, basis = planted()
    one = directions.compute_directions(harmful, harmless, **options)
    out = directions.compute_directions(harmful, harmless, n_directions=3, **options)
    for key in ("directions", "norms", "valid", "harmful_mean"):
        assert torch.equal(out[key], one[key]), key  # today's table, bit for bit
    sets = out["direction_sets"]
    assert sets.shape == (LAYERS, 3, HIDDEN) and sets.dtype == torch.float32
    assert torch.equal(sets[:, 0], one["directions"])
    assert (sets[0] == 0).all()  # no direction at the embedding output: a zero set
    gram = sets[1:] @ sets[1:].mT
    torch.testing.assert_close(gram, torch.eye(3).expand(LAYERS - 1, 3, 3), atol=2e-6, rtol=0)
    if not options:  # the planted second direction is the harmful spread's main one
        assert (abs(sets[1:, 1] @ basis[1]) > 0.95).all()
    if options.get("orthogonalize"):
        h = torch.nn.functional.normalize(out["harmless_mean"][1:].float(), dim=-1)
        assert (sets[1:] @ h[..., None]).abs().max() < 1e-4


def test_one_direction_has_a_set_of_one_and_a_bad_count_is_refused():
    harmful, harmless, _ = planted()
    out = directions.compute_directions(harmful, harmless)
    assert torch.equal(out["direction_sets"][:, 0], out["directions"]) and out["direction_sets"].shape[1] == 1
    with pytest.raises(ConfigError, match="directions.n_directions"):
        directions.compute_directions(harmful, harmless, n_directions=0)


def test_directions_file_without_sets_names_the_rule_to_rerun(tmp_path):
    harmful, harmless, _ = planted()
    out = directions.compute_directions(harmful, harmless, n_directions=2)
    old = tmp_path / "old.safetensors"
    io.save_safetensors({"directions": out["directions"]}, old)
    table, sets = directions.read(old, 1)
    assert torch.equal(table, out["directions"]) and sets is None
    with pytest.raises(ConfigError, match=r"rerun the directions rule.*forcerun directions"):
        directions.read(old, 2)
    new = tmp_path / "new.safetensors"
    io.save_safetensors({"directions": out["directions"], "direction_sets": out["direction_sets"]}, new)
    assert directions.read(new, 2)[1].shape == (LAYERS, 2, HIDDEN)
    with pytest.raises(ConfigError, match="directions.n_directions >= 3"):
        directions.read(new, 3)


def _sets(k=3, seed=1):
    """Random (layers + 1, k, hidden) orthonormal sets and their first rows as the table."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(tm.LAYERS + 1, tm.HIDDEN, k, generator=gen))[0].mT.contiguous()
    return q[:, 0].clone(), q


def test_global_set_interpolates_and_reorthonormalises():
    table, sets = _sets()
    for layer in (0, 0.5, 1.75, 2):
        got = directions_for(sets, layer, 3)
        assert torch.equal(got[0], direction_for(table, layer))
        torch.testing.assert_close(got @ got.T, torch.eye(3), atol=1e-6, rtol=0)
    sets[:, 2] = 0  # a layer whose spread had fewer directions: its row ablates nothing
    assert (directions_for(sets, 1.5, 3)[2] == 0).all()


def _editor(name, row_norm, in_place, k_max=1, batched=True):
    model = tm.FACTORIES[name]()
    table, sets = _sets()
    return (InPlaceEditor if in_place else LoraEditor)(
        model, discover(model), table, row_norm=row_norm, batched=batched, direction_sets=sets, n_directions=k_max)


def _weights(ed):
    return [ed.effective_weight(c) for c in ed.layout.components]


@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
@pytest.mark.parametrize("row_norm", list(RowNorm))
def test_one_direction_is_todays_edit_bit_for_bit(row_norm, in_place):
    """k = 1: the factors are today's delta_factors of the single direction, and an editor whose space
    allows 3 directions gives the same weights for a k = 1 trial."""
    table, _ = _sets()
    unit = table / torch.linalg.vector_norm(table, dim=1, keepdim=True)  # as the editor normalises its table
    params = AblationParams(None, KERNELS)
    ref = _editor("llama", row_norm, in_place, batched=False)
    ref.apply(params)
    assert ref._factors
    for c, (b, a) in ref._factors.items():
        weight = params.kernels[c.kind].weight_at(c.layer)
        view = views(c, ref._backups.get(c, source_weight(c)))[0]
        wb, wa = delta_factors(view, unit[c.layer + 1], weight, row_norm, 3, 0)
        assert torch.equal(b, wb) and torch.equal(a, wa), c.name
    for batched in (False, True):
        one, wide = _editor("llama", row_norm, in_place, 1, batched), _editor("llama", row_norm, in_place, 3, batched)
        for ed in (one, wide):
            ed.apply(AblationParams(1.5, KERNELS))
        for x, y in zip(_weights(one), _weights(wide)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["llama", "gpt2", "moe_fused"])
@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
@pytest.mark.parametrize("row_norm", list(RowNorm))
def test_k_directions_batched_matches_per_component(row_norm, in_place, name):
    runs = []
    for batched in (False, True):
        ed = _editor(name, row_norm, in_place, 3, batched)
        seen = []
        for params in (AblationParams(None, KERNELS, 3, 0.6), AblationParams(0.7, KERNELS, 2, 0.3)):
            ed.apply(params)
            seen.append(_weights(ed))
        ed.reset()
        seen.append(_weights(ed))
        runs.append(seen)
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-6)
    assert all(torch.equal(x, y) for x, y in zip(runs[0][2], runs[1][2]))  # reset: base weights


@pytest.mark.parametrize("in_place", [False, True], ids=["lora", "direct"])
def test_k_directions_remove_every_direction(in_place):
    """NONE with λ = 1 and secondary_weight 1: no edited matrix writes along any of its layer's k directions."""
    _, sets = _sets()
    ed = _editor("llama", RowNorm.NONE, in_place, 3)
    ed.apply(AblationParams(None, {kind: Kernel(1.0, 0.0, 1.0, 1e9) for kind in ("attn_out", "mlp_down")}, 3, 1.0))
    for c in ed.layout.components:
        if c.kind in ("attn_out", "mlp_down"):
            r = sets[c.layer + 1]
            assert torch.matmul(r, ed.effective_weight(c)).abs().max() < 1e-5, c.name
    assert ed.rank == 3


def test_lora_rank_covers_the_largest_k():
    assert _editor("llama", RowNorm.NONE, False, 3).rank == 3
    assert _editor("llama", RowNorm.FULL, False, 3).rank == 5  # full_rank + k - 1
    ed = _editor("llama", RowNorm.FULL, False, 2)
    with pytest.raises(ConfigError, match="at most 2"):
        ed.apply(AblationParams(None, KERNELS, 3, 0.5))
    model = tm.tiny_llama()
    table, _ = _sets()
    with pytest.raises(ConfigError, match="rerun the directions rule"):
        LoraEditor(model, discover(model), table, n_directions=2)


def test_a_kind_switched_off_is_not_edited():
    ed = _editor("llama", RowNorm.FULL, True, 1)
    params = AblationParams.from_flat({**AblationParams(None, {"mlp_down": KERNELS["mlp_down"]}).to_flat(),
                                       "off": "attn_out"})
    assert params.off == ("attn_out",) and set(params.kernels) == {"mlp_down"}
    base = _weights(ed)
    ed.apply(params)
    for c, before, after in zip(ed.layout.components, base, _weights(ed)):
        assert torch.equal(before, after) == (c.kind != "mlp_down"), c.name
    assert {c.kind for c in ed._backups} == {"mlp_down"}  # the off kind is not even backed up
    with pytest.raises(ConfigError, match="both off and edited"):
        AblationParams(None, KERNELS, off=("attn_out",))


def _suggest(space, seed=0):
    s = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    trial = s.ask()
    return trial, study.suggest_params(trial, space, tm.LAYERS)


def test_space_samples_directions_and_switches_kinds_off():
    space = default_space()
    trial, flat = _suggest(space)
    # the default space samples exactly what it sampled before n_directions existed
    assert "n_directions" not in trial.params and "secondary_weight" not in trial.params
    assert flat["n_directions"] == 1 and "off" not in flat
    wide = {**copy.deepcopy(space), "n_directions": [1, 3], "secondary_weight": [0.2, 0.4]}
    for kind in wide["components"]:
        wide["components"][kind]["max_weight"] = [-1.0, -0.5]
    trial, flat = _suggest(wide, seed=3)
    assert flat["n_directions"] == trial.params["n_directions"] in (1, 2, 3)
    assert 0.2 <= flat["secondary_weight"] <= 0.4
    assert flat["off"] == "attn_out,mlp_down" and not any("." in key for key in flat)
    params = AblationParams.from_flat({k: v for k, v in flat.items() if v is not None})
    assert params.kernels == {} and params.off == ("attn_out", "mlp_down")
    assert "attn_out=off mlp_down=off" in study.describe_params(flat)


@pytest.mark.parametrize(("bounds", "match"), [([1, 2.5], "integers"), ([0, 2], "integers")])
def test_space_refuses_bad_direction_counts(bounds, match):
    with pytest.raises(ConfigError, match=f"study.space.n_directions.*{match}"):
        _suggest({**default_space(), "n_directions": bounds})


def _shipped(**space):
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.setdefault("study", {})["space"] = space
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def test_config_checks_direction_counts_at_parse_time():
    wc.check(_shipped(n_directions=[1, 3]))
    with pytest.raises(ConfigError, match=r"study.space.n_directions.*k larger than the number of available"):
        wc.check(_shipped(n_directions=[1, 4]))
    config = _shipped()
    config["study"]["space"]["n_directions"] = [1.5, 2]  # as a --config override could leave it
    with pytest.raises(ConfigError, match="study.space.n_directions: bounds must be integers >= 1"):
        wc.check(config)
    config["study"]["space"]["n_directions"] = [0, 2]
    with pytest.raises(ConfigError, match="study.space.n_directions: bounds must be integers >= 1"):
        wc.check(config)
    config = _shipped()
    config["study"]["space"]["secondary_weight"] = [0.0, 1.5]
    with pytest.raises(ConfigError, match="study.space.secondary_weight"):
        wc.check(config)


def test_batched_factors_with_one_row_are_the_single_direction_code():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 40, generator=gen)
    r = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    lam = torch.tensor([1.0, 0.4, 1.3])
    norms = torch.linalg.vector_norm(w, dim=2)
    for mode in ("none", "pre", "full"):
        one = batched_ablation.batched_factors(w, r, lam, mode, norms=norms, seed=5)
        rows = batched_ablation.batched_factors(w, r[:, None], lam[:, None], mode, norms=norms, seed=5)
        assert all(torch.equal(x, y) for x, y in zip(one, rows)), mode


def test_export_reads_directions_and_off_kinds_from_the_trials_table():
    import pandas as pd
    from abliterate.ablation import off_kinds
    from abliterate.steps import export

    df = pd.DataFrame([
        {"number": 0, "direction_index": float("nan"), "n_directions": 2, "secondary_weight": 0.4, "off": "attn_out",
         **{f"mlp_down.{k}": v for k, v in zip(("max_weight", "max_weight_position", "min_weight",
                                                 "min_weight_distance"), (1.0, 2.0, 0.5, 1.0))}},
        {"number": 1, "direction_index": 1.0, "n_directions": 1, "secondary_weight": 0.1, "off": float("nan"),
         **{f"{kind}.{k}": 1.0 for kind in ("attn_out", "mlp_down")
            for k in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")}},
    ])
    first = export.params_of(df.iloc[0])
    assert first["n_directions"] == 2 and first["off"] == "attn_out" and off_kinds(first) == ["attn_out"]
    params = AblationParams.from_flat(first)
    assert params.n_directions == 2 and params.off == ("attn_out",) and set(params.kernels) == {"mlp_down"}
    assert off_kinds(export.params_of(df.iloc[1])) == [] and export.max_directions(df) == 2
    assert export.max_directions(df.drop(columns="n_directions")) == 1  # a study from before direction sets
