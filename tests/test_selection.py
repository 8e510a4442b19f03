"""Choosing the trial to export: Pareto front, policies, hypervolume, plot."""

from __future__ import annotations

import pandas as pd
import pytest
from abliterate import selection as sel
from abliterate.errors import AbliterateError, ConfigError


def frame(rows, n=20):
    """rows: (number, refusals, kl[, state])."""
    records = []
    for row in rows:
        number, refusals, kl, *state = row
        records.append(
            {
                "number": number,
                "state": state[0] if state else "COMPLETE",
                "refusals": refusals,
                "kl": kl,
                "n": n,
            }
        )
    return pd.DataFrame(records)


# Front (sorted by refusals): 4:(0, 0.9)  1:(1, 0.5)  2:(5, 0.1)  0:(18, 0.01); 3 and 5 dominated.
TRIALS = frame(
    [
        (0, 18, 0.01),
        (1, 1, 0.5),
        (2, 5, 0.1),
        (3, 6, 0.6),
        (4, 0, 0.9),
        (5, 1, 0.7),
        (6, None, None, "FAIL"),
    ]
)


def test_pareto_front_keeps_non_dominated_complete_trials_sorted_by_refusals():
    front = sel.pareto_front(TRIALS)
    assert front["number"].tolist() == [4, 1, 2, 0]


def test_pareto_front_keeps_ties_and_ignores_other_states():
    df = frame([(0, 2, 0.2), (1, 2, 0.2), (2, 3, 0.1), (3, 0, 0.0, "RUNNING")])
    assert sel.pareto_front(df)["number"].tolist() == [0, 1, 2]


def test_default_policy_takes_lowest_kl_under_target():
    row, reason = sel.select_trial(TRIALS)  # target 10% of 20 prompts = at most 2 refusals
    assert row["number"] == 1
    assert "lowest KL" in reason and "trial 1" in reason and "1/20" in reason


def test_target_is_a_fraction_of_n_and_ties_go_to_lower_number():
    df = frame([(0, 4, 0.3), (1, 4, 0.2), (2, 3, 0.2), (3, 0, 0.9)], n=40)
    row, _ = sel.select_trial(df, {"refusal_target": 0.1})  # at most 4 of 40
    assert row["number"] == 1
    row, _ = sel.select_trial(df, {"refusal_target": 0.05})  # at most 2 of 40
    assert row["number"] == 3


def test_fallback_knee_when_no_trial_reaches_target():
    df = frame([(0, 18, 0.01), (1, 10, 0.5), (2, 5, 0.1), (3, 3, 0.9), (4, 19, 0.005)])
    # Normalised front: 3:(0,1) 2:(2/16, ~0.105) 1 dominated 0:(15/16, ~0.005) 4:(1,0)
    row, reason = sel.select_trial(df, {"refusal_target": 0.05})
    assert row["number"] == 2
    assert "knee" in reason and "no trial reached" in reason
    row, reason = sel.select_trial(df, {"refusal_target": 0.05, "fallback": "min_refusals"})
    assert row["number"] == 3 and "fewest refusals" in reason


def test_knee_of_two_points_is_the_lower_trial_number():
    df = frame([(7, 10, 0.1), (3, 12, 0.05)])
    row, dist = sel.knee(sel.pareto_front(df))
    assert row["number"] == 3 and dist == 0.0


def test_min_refusals_policy():
    df = frame([(0, 2, 0.3), (1, 1, 0.5), (2, 1, 0.4), (3, 1, 0.4)])
    row, reason = sel.select_trial(df, {"name": "min_refusals"})
    assert row["number"] == 2 and "fewest refusals" in reason


@pytest.mark.parametrize(
    "policy, match",
    [
        ({"name": "best"}, "name"),
        ({"fallback": "random"}, "fallback"),
        ({"refusal_target": 3}, "refusal_target"),
        ({"refusal_target": True}, "refusal_target"),
        ({"target": 0.1}, "unknown"),
    ],
)
def test_bad_policies_raise_config_error(policy, match):
    with pytest.raises(ConfigError, match=match):
        sel.select_trial(TRIALS, policy)


def test_no_complete_trial_or_no_n_raise():
    with pytest.raises(AbliterateError, match="no COMPLETE"):
        sel.select_trial(frame([(0, None, None, "FAIL")]))
    with pytest.raises(ConfigError, match="'n'"):
        sel.select_trial(TRIALS.drop(columns="n"))


def test_plot_pareto_writes_png(tmp_path):
    path = tmp_path / "plots" / "pareto.png"
    fig = sel.plot_pareto(TRIALS, 1, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # front trials carry their numbers (for export.trial); the selected one its own label
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(labels[:-1]) == ["0", "2", "4"] and labels[-1].startswith("trial 1\n")
    wide = frame([(0, 0, 5.0), (1, 10, 0.001), (2, 3, 0.2)])
    sel.plot_pareto(wide, None, path)  # log-scaled KL, nothing selected
    assert path.stat().st_size > 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["pareto.png"]
    # a model that never refuses: every trial at 0, the refusal axis still has integer ticks
    flat = sel.plot_pareto(frame([(0, 0, 0.3), (1, 0, 0.01)]), 1, path)
    ticks = [t for t in flat.axes[0].get_xticks() if -0.5 <= t <= 2.5]
    assert ticks == [0, 1, 2]


def test_trials_stopped_once_dominated_are_never_chosen_or_counted(tmp_path):
    # Trial 7 stopped after 1 refusal at KL 0.6 (dominated by trial 1: 1 refusal at KL 0.5): its
    # refusals are a lower bound, so even a policy that would like its count must not take it.
    df = TRIALS.assign(dominated_by=pd.NA)
    df = pd.concat([df, frame([(7, 1, 0.6)]).assign(dominated_by=1)], ignore_index=True)
    assert sel.pareto_front(df)["number"].tolist() == [4, 1, 2, 0]
    row, reason = sel.select_trial(df, {"refusal_target": 0.05})
    assert row["number"] == 1 and "3 of 6 fully evaluated" in reason  # 1, 4 and 5, not 7
    assert "1 more stopped once dominated" in reason
    stopped = frame([(8, 0, 0.2)]).assign(dominated_by=4)  # would be the best of all if believed
    row, _ = sel.select_trial(pd.concat([df, stopped], ignore_index=True), {"name": "min_refusals"})
    assert row["number"] == 4
    sel.plot_pareto(pd.concat([df, stopped], ignore_index=True), 1, tmp_path / "pareto.png")


def test_a_named_trial_is_exported_if_it_was_measured_in_full():
    df = pd.concat([TRIALS.assign(dominated_by=pd.NA), frame([(7, 1, 0.6)]).assign(dominated_by=1)],
                   ignore_index=True)
    row, reason = sel.named_trial(df, 3)  # dominated, but complete: the user's call
    assert row["number"] == 3 and reason == "trial 3: named by export.trial (6/20 refusals, KL 0.6)"
    for number, message in [(9, r"no trial 9 \(trials 0 to 7\)"), (6, r"trial 6 is FAIL, not COMPLETE"),
                            (7, r"stopped once trial 1 dominated it, so its 1 refusals are only a lower bound")]:
        with pytest.raises(ConfigError, match=rf"export\.trial: .*{message}.*holds trials 4, 1, 2, 0"):
            sel.named_trial(df, number)


def confirmed(rows, eval_n=50, train_n=100, kl_n=50, train_kl_n=100):
    """rows: (number, eval refusals, eval KL, train refusals, train KL[, stopped])."""
    return pd.DataFrame([{"number": number, "refusals": r, "n": eval_n, "kl": k, "kl_n": kl_n,
                          "confirm_refusals": cr, "confirm_n": train_n, "confirm_kl": ck,
                          "confirm_kl_n": train_kl_n, "confirm_stopped": bool(stopped and stopped[0])}
                         for number, r, k, cr, ck, *stopped in rows])


def test_confirmation_candidates_are_the_front_trials_within_the_target_by_kl():
    # target 10% of 20: eval front 4:(0, 0.9) 1:(1, 0.5) 2:(5, 0.1) 0:(18, 0.01); 5 (1, 0.7) is dominated
    assert sel.confirmation_candidates(TRIALS)["number"].tolist() == [1, 4]
    assert sel.confirmation_candidates(TRIALS, {"refusal_target": 0.25})["number"].tolist() == [2, 1, 4]


def test_nothing_to_confirm_without_a_trial_under_target_or_for_min_refusals():
    assert sel.confirmation_candidates(frame([(0, 5, 0.1), (1, 3, 0.3)])).empty  # 15% and 25% of 20
    assert sel.confirmation_candidates(TRIALS, {"name": "min_refusals"}).empty


def test_confirmed_choice_pools_eval_and_train_counts():
    # The eval choice (trial 1: 5/50 at KL 0.05) refuses 16/100 train prompts: 21/150 = 14% > 10%.
    measured = confirmed([(1, 5, 0.05, 16, 0.06), (2, 2, 0.07, 9, 0.09), (3, 1, 0.10, 5, 0.11)])
    row, reason = sel.select_confirmed(measured)
    assert row["number"] == 2  # 11/150; KL (0.07*50 + 0.09*100)/150
    assert row["pooled_kl"] == pytest.approx((0.07 * 50 + 0.09 * 100) / 150)
    assert "trial 2" in reason and "eval 2/50, train 9/100" in reason


def test_confirmed_choice_ranks_by_pooled_kl_and_never_takes_a_trial_over_target_on_eval():
    measured = confirmed([(4, 2, 0.09, 6, 0.10), (6, 4, 0.08, 2, 0.09)])
    assert sel.select_confirmed(measured)[0]["number"] == 6
    # trial 5 refused 6/50 eval prompts (over target) and only 4/100 train: 10/150 pooled is within
    # 10 %, but a kind train split does not undo a count over the target
    measured = confirmed([(4, 2, 0.09, 6, 0.10), (5, 6, 0.04, 4, 0.05)])
    assert sel.select_confirmed(measured)[0]["number"] == 4


def test_no_confirmed_trial_returns_none_and_the_best_pooled_rate():
    row, reason = sel.select_confirmed(confirmed([(1, 5, 0.05, 30, 0.06), (2, 4, 0.07, 20, 0.08)]))
    assert row is None and "trial 2" in reason and "16.0%" in reason


def test_confirmation_stops_where_the_candidate_can_no_longer_be_chosen():
    row = {"refusals": 5, "n": 50, "kl": 0.05}
    # 10% of 150 prompts: at most 15 refusals, 5 on eval, so the 11th train refusal rejects it
    assert sel.confirmation_cap(row, 50, 0.06, 100, 100, None) == 11
    assert sel.confirmation_cap({**row, "refusals": 16}, 50, 0.06, 100, 100, None) == 0
    # pooled KL (0.05*50 + 0.06*100)/150 = 0.0567 above a confirmed candidate's 0.055: nothing to generate
    assert sel.confirmation_cap(row, 50, 0.06, 100, 100, 0.055) == 0
    assert sel.confirmation_cap(row, 50, 0.06, 100, 100, 0.06) == 11


def test_stopped_candidates_are_never_chosen():
    # trial 7 stopped at once (its KL already above trial 8's): refusals 0 are a bound, not a count
    measured = confirmed([(7, 1, 0.12, 0, 0.13, True), (8, 2, 0.07, 9, 0.09)])
    row, _ = sel.select_confirmed(measured)
    assert row["number"] == 8
    row, reason = sel.select_confirmed(confirmed([(7, 4, 0.05, 12, 0.06, True)]))
    assert row is None and ">= 10.7%" in reason
