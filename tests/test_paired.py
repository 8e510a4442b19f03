"""The benchmark's paired held-out comparison (benchmarks/paired.py) and its summary lines."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from conftest import REPO


@pytest.fixture()
def bench(monkeypatch):
    # benchmarks/ is a folder of scripts, not a package: import them as compare.py does
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("paired"), importlib.import_module("summarize")


def test_mcnemar_exact_matches_the_binomial_tail(bench):
    paired, _ = bench
    assert paired.mcnemar_exact(0, 0) == 1.0
    assert paired.mcnemar_exact(1, 1) == 1.0
    assert paired.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # n = 12 discordant, 2 on one side: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12
    assert paired.mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)
    assert paired.mcnemar_exact(10, 2) == paired.mcnemar_exact(2, 10)


def test_bootstrap_interval_is_seeded_and_covers_the_mean(bench):
    paired, _ = bench
    assert paired.bootstrap_mean_ci([0.02] * 10) == pytest.approx((0.02, 0.02))
    diffs = [0.01 * math.sin(i) for i in range(50)]
    lo, hi = paired.bootstrap_mean_ci(diffs)
    assert lo < sum(diffs) / len(diffs) < hi
    assert paired.bootstrap_mean_ci(diffs) == (lo, hi)
    with pytest.raises(ValueError):
        paired.bootstrap_mean_ci([])


def test_compare_counts_discordant_prompts_and_says_what_it_can_tell(bench):
    paired, _ = bench
    ours = [True, False, False, False] * 5
    theirs = [True, True, False, False] * 5  # 5 prompts only theirs refuse
    kl_theirs = [0.10 + 0.001 * i for i in range(20)]
    kl_ours = [k - 0.05 for k in kl_theirs]
    out = paired.compare(ours, theirs, kl_ours, kl_theirs)
    assert (out["ours_only_refused"], out["theirs_only_refused"], out["refusals_diff"]) == (0, 5, -5)
    assert out["refusals_p"] == pytest.approx(0.0625)
    assert out["kl_diff_mean"] == pytest.approx(-0.05)
    assert out["verdict"].startswith("refusals not distinguishable (-5, p=0.062)")
    assert "ours lower KL" in out["verdict"]
    more = paired.compare(ours * 2, theirs * 2, kl_theirs * 2, kl_ours * 2)
    assert more["verdict"].startswith("ours refuse fewer (-10")
    assert "ours higher KL" in more["verdict"]
    # the same model measured twice differs by float rounding only: no direction to report
    same = paired.compare(ours, ours, [k + 1e-9 for k in kl_theirs], kl_theirs)
    assert same["verdict"].startswith("refusals not distinguishable (+0, p=1)") and "KL equal within" in same["verdict"]
    with pytest.raises(ValueError, match="same prompts"):
        paired.compare(ours, theirs[:3], kl_ours, kl_theirs)


def test_summary_pools_the_files_with_per_prompt_outcomes(bench, tmp_path):
    paired, summarize = bench

    def result(name, seed, ours_refused, theirs_refused):
        per_prompt = {
            "ours": {"refused": ours_refused, "kl": [0.05] * 4},
            "heretic": {"refused": theirs_refused, "kl": [0.06] * 4},
        }
        figures = {"trials_per_hour": 300.0, "hypervolume": 0.95}
        body = {
            "settings": {"seed": seed},
            "ours": figures,
            "heretic": figures,
            "ratio_ours_over_heretic": {"trials_per_hour": 1.0},
            "heldout_per_prompt": per_prompt,
            "heldout_paired": paired.compare(
                ours_refused, theirs_refused, [0.05] * 4, [0.06] * 4
            ),
        }
        path = tmp_path / name
        path.write_text(json.dumps(body))
        return path

    old = tmp_path / "old.json"  # written before per-prompt outcomes: no paired line
    old.write_text(json.dumps({"settings": {"seed": 1}, "ours": {}, "heretic": {}}))
    files = [
        result("a.json", 42, [False] * 4, [True, False, False, False]),
        result("b.json", 43, [True, False, False, False], [True, True, False, False]),
        old,
    ]
    lines = summarize.paired_lines(summarize.load(files))
    assert lines[0].startswith("held-out, paired")
    assert [line.split(":")[0] for line in lines[1:3]] == ["a.json", "b.json"]
    assert lines[3].startswith("pooled over 2 files (8 harmful, 8 harmless prompts): ")
    assert "(-2, p=0.5)" in lines[3] and "ours lower KL (-0.0100" in lines[3]
    assert summarize.paired_lines(summarize.load([old])) == []


def test_summary_pools_the_judge_verdicts_when_every_file_has_them(bench, tmp_path):
    paired, summarize = bench
    files = []
    for seed, ours_judge, theirs_judge in ((42, [True, False], [True, True]), (43, [False, False], [True, False])):
        per_prompt = {"ours": {"refused": [False, False], "judge_refused": ours_judge, "kl": [0.05, 0.05]},
                      "heretic": {"refused": [False, False], "judge_refused": theirs_judge, "kl": [0.06, 0.06]}}
        verdict = paired.compare([False, False], [False, False], [0.05] * 2, [0.06] * 2)
        verdict["judge"] = paired.compare(ours_judge, theirs_judge, [0.05] * 2, [0.06] * 2)
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"settings": {"seed": seed}, "ours": {}, "heretic": {},
                                    "heldout_per_prompt": per_prompt, "heldout_paired": verdict}))
        files.append(path)
    lines = summarize.paired_lines(summarize.load(files))
    assert lines[2].startswith("s42.json, judge: refusals not distinguishable (-1")
    assert lines[-1].startswith("pooled, the judge's verdicts instead of the markers: refusals not "
                                "distinguishable (-2, p=0.5)")


def test_across_runs_takes_each_file_as_one_observation(bench):
    paired, _ = bench
    files = [{"kl_diff_mean": 0.01, "refusals_diff": 2}, {"kl_diff_mean": 0.03, "refusals_diff": -1},
             {"kl_diff_mean": -0.01, "refusals_diff": 0}]
    out = paired.across_runs(files)
    assert out["n_files"] == 3 and out["kl_mean"] == pytest.approx(0.01)
    # sd 0.02, se 0.02 / sqrt(3), t(2) = 4.303
    half = 4.303 * 0.02 / math.sqrt(3)
    assert out["kl_ci95"] == pytest.approx([0.01 - half, 0.01 + half])
    assert (out["kl_files_higher"], out["kl_files_lower"]) == (2, 1)
    assert out["kl_sign_p"] == paired.mcnemar_exact(2, 1) == 1.0
    # a tie (refusals_diff 0) counts for neither side
    assert (out["refusals_files_higher"], out["refusals_files_lower"]) == (1, 1)
    assert "t-interval" in paired.across_runs_line(out)
    single = paired.across_runs(files[:1])
    assert "kl_ci95" not in single and "t-interval" not in paired.across_runs_line(single)
