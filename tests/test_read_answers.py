"""benchmarks/read_answers.py: the reader's calls joined with the verdicts, and what each verdict gets right."""

from __future__ import annotations

import importlib

import pytest
from conftest import REPO


@pytest.fixture()
def read_answers(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("read_answers")


def _rec(tool, i, m48, whole, judge):
    return {"tool": tool, "heldout_index": i, "markers_48": m48, "markers_whole": whole, "judge": judge,
            "response": "…", "_prompt": "secret"}


def test_reading_and_summary(read_answers):
    recs = [_rec("ours", 0, "refused", "refused", "refused"), _rec("ours", 1, "complied", "complied", "refused"),
            _rec("heretic", 0, "complied", "complied", "complied"), _rec("heretic", 1, "complied", "refused", "complied")]
    reading = {"ours": {"0": {"refused": True, "note": "declines"}},
               "heretic": {"1": {"refused": True, "note": "a redirect"}}}
    got = read_answers.apply_reading(recs, reading)
    assert [r["refused"] for r in got] == [True, False, False, True]
    assert all("_prompt" not in r for r in got)  # the prompt's text is not written
    s = read_answers.summarize(got)
    assert s["ours"] == {"n": 2, "read": 1, "markers_48": 1, "markers_48_right": 2, "markers_whole": 1,
                         "markers_whole_right": 2, "judge": 2, "judge_right": 1}
    assert s["heretic"]["markers_48_right"] == 1 and s["heretic"]["markers_whole_right"] == 2
    assert s["paired_read"] == {"ours_only": 1, "heretic_only": 1}


@pytest.mark.parametrize("reading", [{"nobody": {}}, {"ours": {"2": {"refused": True}}}, {"ours": {"x": {"refused": True}}}])
def test_a_reading_that_names_no_answer_stops(read_answers, reading):
    recs = [_rec("ours", 0, "refused", "refused", "refused"), _rec("ours", 1, "complied", "complied", "complied")]
    with pytest.raises(SystemExit):
        read_answers.apply_reading(recs, reading)


def test_blind_agreement(read_answers):
    labels = {"records": [{"tool": "ours", "heldout_index": 0, "refused": True},
                          {"tool": "ours", "heldout_index": 1, "refused": False},
                          {"tool": "heretic", "heldout_index": 0, "refused": False},
                          {"tool": "heretic", "heldout_index": 1, "refused": False}]}
    key = {"a000": {"tool": "heretic", "heldout_index": 1}, "a001": {"tool": "ours", "heldout_index": 0},
           "a002": {"tool": "ours", "heldout_index": 1}, "a003": {"tool": "heretic", "heldout_index": 0}}
    blind = {"a000": {"refused": True, "note": "a redirect"}, "a001": {"refused": True},
             "a002": {"refused": False}, "a003": {"refused": False}}
    got = read_answers.agreement(labels, blind, key)
    assert got["agreement"] == 0.75
    assert got["kappa"] == 0.5  # chance 0.5: both readers call a quarter and a half refused
    assert got["refused_by_tool"] == {"ours": {"first": 1, "second": 1, "both": 1, "either": 1},
                                      "heretic": {"first": 0, "second": 1, "both": 0, "either": 1}}
    assert got["differ"] == [{"tool": "heretic", "heldout_index": 1, "first": False, "second": True,
                              "second_note": "a redirect"}]
    with pytest.raises(SystemExit):
        read_answers.agreement(labels, {"a000": {"refused": True}}, key)


def test_pooled_reading(read_answers):
    def labels(ours, heretic):
        return {"records": [{"tool": t, "heldout_index": i, "refused": v}
                            for t, calls in (("ours", ours), ("heretic", heretic)) for i, v in enumerate(calls)]}

    def second(ours, heretic):
        return {"calls": labels(ours, heretic)["records"]}

    runs = [labels([True, False], [True, True]), labels([False], [True])]
    got = read_answers.pooled_reading(runs, [second([True, True], [False, True]), second([False], [False])])
    assert got["first"] | {"p": None} == {"n": 3, "ours": 1, "heretic": 3, "ours_only": 0, "heretic_only": 2, "p": None}
    assert (got["second"]["ours"], got["second"]["heretic"]) == (2, 1)
    assert (got["both"]["ours"], got["both"]["heretic"]) == (1, 1)
    assert (got["either"]["ours"], got["either"]["heretic"]) == (2, 3)
    assert set(read_answers.pooled_reading(runs, [])) == {"first"}
    with pytest.raises(SystemExit):
        read_answers.pooled_reading(runs, [second([True, True], [False, True])])
