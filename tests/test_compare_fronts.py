"""benchmarks/compare_fronts.py: both tools' held-out fronts side by side."""

from __future__ import annotations

import importlib
import json

import pytest
from conftest import REPO


@pytest.fixture()
def compare_fronts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("compare_fronts")


def _trial(number, eval_refusals, eval_kl, held_refusals, held_kl):
    return {"number": number, "eval": {"refusals": eval_refusals, "n": 50, "kl": eval_kl},
            "heldout": {"refusals": held_refusals, "n": 50, "kl": held_kl, "refused": []}}


def _files(tmp_path):
    source = tmp_path / "result.json"
    source.write_text(json.dumps({"settings": {"seed": 45}}))
    ours = {"tool": "ours", "chosen": 3, "protocol": "cpu-demo", "split": "heldout",
            "hypervolume": {"eval": 0.97, "heldout": 0.92},
            "trials": [_trial(1, 0, 0.1, 1, 0.16), _trial(3, 5, 0.06, 4, 0.12), _trial(4, 10, 0.05, 6, 0.09)]}
    heretic = {"tool": "heretic", "chosen": 7, "source": str(source), "split": "heldout", "hypervolume": {"eval": 0.96, "heldout": 0.91},
               "trials": [_trial(7, 5, 0.047, 4, 0.067), _trial(8, 3, 0.05, 5, 0.10), _trial(9, 12, 0.03, 8, 0.05)]}
    paths = tmp_path / "ours.json", tmp_path / "heretic.json"
    for path, front in zip(paths, (ours, heretic)):
        path.write_text(json.dumps(front))
    return paths


def test_chosen_and_best_within_target_per_tool(compare_fronts, tmp_path, capsys):
    ours, heretic = _files(tmp_path)
    out = tmp_path / "fronts.json"
    assert compare_fronts.main(["--pair", str(ours), str(heretic), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["pairs"]
    assert row["seed"] == 45
    assert row["ours"]["chosen"]["number"] == 3 and row["heretic"]["chosen"]["number"] == 7
    # within 10 % held out (5 of 50): ours' lowest KL there is trial 3 (trial 4 refuses 6), Heretic's trial 7
    assert row["ours"]["best_within_target"]["number"] == 3
    assert row["heretic"]["best_within_target"]["heldout"] == {"refusals": 4, "n": 50, "kl": 0.067}
    assert "#7 4/50 0.067" in capsys.readouterr().out
    assert compare_fronts.main(["--pair", str(ours), str(heretic), "--target", "0.2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"][0]["ours"]["best_within_target"]["number"] == 4


def test_the_chosen_trial_is_the_one_the_front_file_records(compare_fronts, tmp_path):
    _, heretic = _files(tmp_path)
    front = json.loads(heretic.read_text())
    front["chosen"] = 8
    assert compare_fronts.summary(front, 0.1)["chosen"]["number"] == 8


def test_fronts_on_different_splits_are_refused(compare_fronts, tmp_path):
    ours, heretic = _files(tmp_path)
    front = json.loads(heretic.read_text())
    front["split"] = "train"
    heretic.write_text(json.dumps(front))
    with pytest.raises(SystemExit, match="different splits"):
        compare_fronts.main(["--pair", str(ours), str(heretic)])


@pytest.fixture()
def compare(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    monkeypatch.syspath_prepend(str(REPO / "workflow"))
    return importlib.import_module("compare")


def test_hypervolume_known_values(compare):
    hv = compare.hypervolume_2d
    assert hv([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7.0)
    assert hv([(0, 0)], (1, 1)) == pytest.approx(1.0)
    # dominated points and points outside the reference box add nothing
    assert hv([(1, 3), (2, 1), (3, 3), (5, 0), (0, 4)], (4, 4)) == pytest.approx(7.0)
    assert hv([], (1, 1)) == 0.0
    assert hv([(0.1, 0.2), (0.5, 0.05)], (1.0, 1.0)) == pytest.approx(0.9 * 0.8 + 0.5 * 0.15)
    with pytest.raises(ValueError, match="NaN"):
        hv([(float("nan"), 0.1)], (1, 1))


def test_hypervolume_matches_brute_force(compare):
    import numpy as np

    pts = np.random.default_rng(0).random((30, 2))
    grid = (np.arange(400) + 0.5) / 400
    xx, yy = np.meshgrid(grid, grid)
    covered = np.zeros_like(xx, dtype=bool)
    for x, y in pts:
        covered |= (xx >= x) & (yy >= y)
    assert compare.hypervolume_2d(pts, (1, 1)) == pytest.approx(covered.mean(), abs=5e-3)
