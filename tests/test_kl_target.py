"""The sampler's KL-target view (abliterate.kl_target): what TPE sees, and that the study keeps measured values."""

from __future__ import annotations

import optuna
import pytest
from abliterate import kl_target, study
from optuna.distributions import FloatDistribution
from optuna.samplers._tpe.sampler import _split_trials
from optuna.trial import TrialState, create_trial


def test_sampler_values():
    assert kl_target.sampler_values(3, 0.05, 50, 0.01) == (3, 0.05)
    assert kl_target.sampler_values(40, 0.004, 50, 0.01) == (40, 0.008)
    assert kl_target.sampler_values(10, 0.004, 50, 0.01) == (10, 0.002)


def _study(points):
    s = optuna.create_study(directions=["minimize", "minimize"])
    dist = {"x": FloatDistribution(0, 1)}
    for i, (refusals, kl) in enumerate(points):
        s.add_trial(create_trial(params={"x": i / len(points)}, distributions=dist, values=[refusals, kl],
                                 user_attrs={"n": 50}))
    return s


# an edit that does nothing (38 of 50 refused, KL 0.002) is on the measured front; the view ranks it
# by its refusals below the target, where a trial refusing 20 at KL 0.008 beats it
POINTS = [(38, 0.002), (20, 0.008), (4, 0.07), (2, 0.09), (10, 0.05), (30, 0.06), (25, 0.1), (45, 0.2)]


def test_the_view_moves_do_nothing_trials_out_of_the_good_group():
    s = _study(POINTS)
    trials = s._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    view = kl_target._SamplerView(s, 0.01)
    seen = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.values for t in seen][:2] == [[38, 38 / 50 * 0.01], [20, 20 / 50 * 0.01]]
    below, _ = _split_trials(s, trials, 4)
    below_view, _ = _split_trials(view, seen, 4)
    assert 0 in [t.number for t in below] and 0 not in [t.number for t in below_view]
    assert s.trials[0].values == [38, 0.002]  # the study itself is unchanged


def test_run_worker_with_a_kl_target(tmp_path, caplog):
    import logging

    def objective(params, number):
        w = params["attn_out.max_weight"]
        return {"refusals": int(50 * (1.5 - w)), "kl": 0.1 * (w - 0.8) ** 2, "n": 50}

    caplog.set_level(logging.INFO)
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    result = study.run_worker(url, "kl-target", objective, 14, seed=1, n_layers=4,
                              sampler_kwargs={"n_startup_trials": 4, "kl_target": 0.01}, progress=False)
    assert result["n_complete"] == 14
    assert "study.kl_target" in caplog.text
    stored = optuna.load_study(study_name="kl-target", storage=url).trials
    assert all(t.values[1] == pytest.approx(0.1 * (t.params["attn_out.max_weight"] - 0.8) ** 2) for t in stored
               if t.state == TrialState.COMPLETE)


def test_the_sampler_is_chosen_by_the_setting():
    assert isinstance(study._sampler(0, "0", 0, {"kl_target": 0.01}), kl_target.KLTargetTPESampler)
    assert type(study._sampler(0, "0", 0, {"kl_target": None})) is optuna.samplers.TPESampler


def test_the_refusal_floor():
    assert kl_target.sampler_values(2, 0.07, 50, None, 0.1) == (5, 0.07)
    assert kl_target.sampler_values(8, 0.04, 50, None, 0.1) == (8, 0.04)
    assert kl_target.sampler_values(38, 0.004, 50, 0.01, 0.1) == (38, 38 / 50 * 0.01)
    assert kl_target.sampler_values(0, 0.2, 50, None, 0.0) == (0, 0.2)


def test_the_refusal_floor_ranks_trials_under_the_target_by_kl_alone():
    # (1, 0.3) and (0, 0.5) are on the measured front; under a floor of 5 refusals they are
    # dominated by (4, 0.07), which the export target accepts at a lower KL
    s = _study([(1, 0.3), (0, 0.5), (4, 0.07), (30, 0.01), (20, 0.02), (45, 0.2), (40, 0.3), (35, 0.4)])
    trials = s._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    view = kl_target._SamplerView(s, None, 0.1)
    seen = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    below, _ = _split_trials(s, trials, 3)
    below_view, _ = _split_trials(view, seen, 3)
    assert {0, 1} & {t.number for t in below}
    assert not {0, 1} & {t.number for t in below_view} and 2 in {t.number for t in below_view}


def test_a_refusal_floor_alone_picks_the_view_sampler():
    sampler = study._sampler(0, "0", 0, {"kl_target": None, "refusal_floor": 0.1})
    assert isinstance(sampler, kl_target.KLTargetTPESampler)
