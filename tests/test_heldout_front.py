"""benchmarks/heldout_front.py: every front trial of a finished run, re-applied and measured held out."""

from __future__ import annotations

import importlib
import json
import shutil

import pandas as pd
import pytest
import torch
from abliterate import io, study
from conftest import REPO
from study_space import SPACE


@pytest.fixture()
def heldout_front(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("heldout_front")


def _work(heldout_front, tmp_path, n_layers: int):
    """The parts of a compare.py working folder the script reads: our run's config, prompt splits,
    directions and study (three trials from a stand-in objective; the script never calls it)."""
    ours = tmp_path / "work" / "ours"
    run = ours / "results" / "bench-smoke"
    run.mkdir(parents=True)
    shutil.copy(REPO / "config.yaml", ours / "config.yaml")
    for name in ("harmful", "harmless"):
        rows = [{"prompt": f"{name} prompt {i}", "split": split} for split in ("train", "eval", "heldout")
                for i in range(3)]
        io.write_parquet(pd.DataFrame(rows), heldout_front.compare.ours_prompts_dir(ours) / f"{name}.parquet")
    torch.manual_seed(0)
    io.save_safetensors({"directions": torch.randn(n_layers + 1, 64)}, run / "directions.safetensors")

    def objective(params, number):  # stands in for the study's evaluation
        w = params["attn_out.max_weight"]
        return {"refusals": number, "kl": 1.0 / (1 + number) * w, "n": 3}

    study.run_worker(f"sqlite:///{run / 'study.sqlite'}", "smoke", objective, 3, seed=1, n_layers=n_layers,
                     sampler_kwargs={"n_startup_trials": 3}, progress=False, space=SPACE)
    return tmp_path / "work"


def test_each_front_trial_is_measured_on_the_heldout_split(heldout_front, tmp_path, tiny_model_path, capsys):
    work = _work(heldout_front, tmp_path, n_layers=3)
    out = tmp_path / "front.json"
    assert heldout_front.main(["--work", str(work), "--protocol", "smoke", "--model", str(tiny_model_path),
                               "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    numbers = [t["number"] for t in result["trials"]]
    assert numbers == [0, 1, 2]  # refusals rise as KL falls: all three are on the front
    for t in result["trials"]:
        assert t["heldout"]["n"] == 3 and len(t["heldout"]["refused"]) == 3
        assert t["heldout"]["kl"] > 0 and len(t["heldout"]["kl_per_prompt"]) == 3
        assert t["eval"]["n"] == 3
    assert result["base"]["n"] == 3 and result["run_config_hash"]
    assert result["tool"] == "ours" and result["chosen"] is None  # this stand-in run has no export
    assert set(result["hypervolume"]) == {"eval", "heldout"}
    assert "held-out" in capsys.readouterr().out


def test_another_split_is_measured_under_its_name(heldout_front, tmp_path, tiny_model_path, capsys):
    work = _work(heldout_front, tmp_path, n_layers=3)
    out = tmp_path / "front.json"
    assert heldout_front.main(["--work", str(work), "--protocol", "smoke", "--model", str(tiny_model_path),
                               "--split", "train", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "train" and set(result["hypervolume"]) == {"eval", "train"}
    assert all("heldout" not in t and t["train"]["n"] > 0 for t in result["trials"])
    assert "train" in capsys.readouterr().out


def test_each_trial_starts_from_the_base_model(heldout_front, tmp_path, tiny_model_path):
    # the edit is reset after each trial: measuring in the other order gives the same figures
    ours = _work(heldout_front, tmp_path, n_layers=3) / "ours"
    smoke = heldout_front.compare.PROTOCOLS["smoke"]

    def kls(order):
        trials = heldout_front.front_trials(ours, "bench-smoke", everything=True)
        trials = [trials[i] for i in order]
        result = heldout_front.measure(smoke, str(tiny_model_path), ours, "bench-smoke", trials)
        return {t["number"]: t["heldout"]["kl"] for t in result["trials"]}

    forward, backward = kls([0, 1, 2]), kls([2, 1, 0])
    assert forward == pytest.approx(backward, rel=1e-5, abs=1e-7)
    assert len(set(forward.values())) == 3


# --- Heretic's front (--heretic): the parts that run in our environment ---------------------------


def _heretic_result(trials):
    return {"raw": {"heretic": {"n_bad_eval": 50, "selected": {"number": 1}, "trials": [
        {"number": n, "state": state, "refusals": r, "n": 50, "kl": kl, "direction_index": None,
         "parameters": {"attn.o_proj": {"max_weight": 1.0}}}
        for n, state, r, kl in trials]}}}


def test_heretic_front_trials_are_its_complete_pareto_trials_with_their_parameters(heldout_front):
    result = _heretic_result([(0, "COMPLETE", 20, 0.01), (1, "COMPLETE", 5, 0.05), (2, "COMPLETE", 6, 0.06),
                              (3, "FAIL", 0, 0.0), (4, "COMPLETE", 0, 0.2)])
    front = heldout_front.heretic_front_trials(result, everything=False)
    assert [t["number"] for t in front] == [4, 1, 0]  # 2 is dominated by 1; 3 failed
    assert front[1]["eval"] == {"refusals": 5, "n": 50, "kl": 0.05}
    assert front[1]["parameters"] == {"attn.o_proj": {"max_weight": 1.0}} and front[1]["direction_index"] is None
    assert [t["number"] for t in heldout_front.heretic_front_trials(result, everything=True)] == [4, 1, 2, 0]


def test_heretic_choice_must_reproduce_the_run_prompt_by_prompt(heldout_front):
    result = _heretic_result([(1, "COMPLETE", 5, 0.05)])
    result["heldout_per_prompt"] = {"heretic": {"refused": [True, False], "kl": [0.1, 0.3]}}
    trials = [{"number": 1, "heldout": {"refusals": 1, "n": 2, "refused": [True, False], "kl": 0.2 + 1e-6}}]
    assert "identical" in heldout_front.check_heretic_choice(result, trials, "heldout")
    trials[0]["heldout"]["refused"] = [False, False]
    with pytest.raises(SystemExit, match="does not reproduce"):
        heldout_front.check_heretic_choice(result, trials, "heldout")


def test_adapters_are_measured_one_at_a_time_on_the_base_model(heldout_front, tmp_path, tiny_model_path):
    # Heretic's trials arrive as PEFT adapters; each must be measured on the unedited base (the last
    # one's LoRA layers unloaded), so the order does not matter and an all-zero adapter gives KL 0.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = _work(heldout_front, tmp_path, n_layers=3) / "ours"
    splits = heldout_front.compare.workflow_splits(ours, "bench-smoke")
    adapters = {}
    for number, scale in ((0, 0.0), (1, 0.5), (2, 2.0)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["o_proj"]))
        torch.manual_seed(number)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p) * scale
        adapters[number] = str(tmp_path / f"trial-{number}")
        peft.save_pretrained(adapters[number])
    smoke = heldout_front.compare.PROTOCOLS["smoke"]

    def kls(order):
        trials = [{"number": n, "eval": {"refusals": 0, "n": 3, "kl": 0.0}} for n in order]
        result = heldout_front.measure_adapters(smoke, str(tiny_model_path), splits, trials, adapters)
        return {t["number"]: t["heldout"]["kl"] for t in result["trials"]}

    forward, backward = kls([0, 1, 2]), kls([2, 1, 0])
    assert forward == pytest.approx(backward, rel=1e-5, abs=1e-7)
    assert forward[0] == pytest.approx(0.0, abs=1e-6) and forward[1] > 0 and forward[2] > 0
    assert forward[1] != pytest.approx(forward[2])
