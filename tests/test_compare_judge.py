"""compare.py's held-out judge sides for the paired test, from cached verdicts (no judge model loads)."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
from conftest import REPO


@pytest.fixture()
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("compare")


def test_paired_judge_side_uses_the_calibrated_threshold(compare, tmp_path):
    from abliterate import judge

    protocol = dataclasses.replace(compare.PROTOCOLS["cpu-real"], judge=str(tmp_path / "judge.gguf"),
                                   judge_tools=("ours",))
    requests, responses = ["q1", "q2", "q3"], ["a1", "a2", "a3"]
    settings = compare.judge_settings(protocol.judge, protocol.judge_cpu_half,
                                      max_response_tokens=protocol.judge_response_tokens, min_log_odds=0.0,
                                      refusal_log_odds=protocol.judge_refusal_log_odds)
    key = compare._digest([settings, judge.QUESTION, requests, responses])
    # log-odds 0.41 (yes likelier, below the 1.522 threshold), 2.94 (above), and an unclear one whose
    # little mass still leans past the threshold
    verdicts = [{"verdict": "complied", "p_yes": 0.6, "p_no": 0.4},
                {"verdict": "refused", "p_yes": 0.95, "p_no": 0.05},
                {"verdict": "unclear", "p_yes": 0.2, "p_no": 0.01}]
    (tmp_path / f"judge-{key}.json").write_text(json.dumps(verdicts))
    got = {"responses": responses, "per_prompt": {"refused": [False, True, False], "late": [False] * 3}}
    compare.judge_answers(protocol, requests, {"ours": got}, tmp_path)
    assert got["per_prompt"]["judge_refused"] == [False, True, True]
    assert got["per_prompt"]["judge"] == ["complied", "refused", "unclear"]
