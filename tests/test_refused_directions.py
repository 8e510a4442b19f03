"""directions.refused_only: the directions rule takes its harmful mean from only the train prompts the
unmodified model refuses, judged as the study judges, on a tiny saved model."""

from __future__ import annotations

import copy
import logging
import re

import pandas as pd
import pytest
import torch
import workflow_runner as wr
from abliterate import io, refusal, residuals, session
from abliterate import rule_settings as rs
from abliterate.directions import compute_directions
from abliterate.evaluation import EvalSettings, measure
from abliterate.steps import directions as step
from snakemake.utils import validate
from test_generation import PROMPTS
from tiny_tokenizer import tiny_model_dir

HARMLESS = ["Name a colour.", "Count to three.", "Say hello.", "What is two plus two?", "Spell cat."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("refused")
    model = tiny_model_dir(work / "model")
    tables = {}
    for name, prompts in (("harmful", PROMPTS), ("harmless", HARMLESS)):
        tables[name] = work / f"{name}.parquet"
        pd.DataFrame({"prompt": prompts, "group": None, "split": "train"}).to_parquet(tables[name])
    return work, model, tables


def _settings(model, **directions) -> dict:
    config = wr.tiny_config(model, directions={"batch_size": 4, **directions},
                            evaluation={"max_new_tokens": 6, "batch_size": 4, "cuda_graphs": False})
    validate(config, str(rs.SCHEMA))
    return config


def _run(config, tables, out):
    out.mkdir(exist_ok=True)
    meta = step.run(rs.settings(config, "directions"), str(tables["harmful"]), str(tables["harmless"]),
                    str(out / "directions.safetensors"), str(out / "directions.png"), "hash")
    tensors, _ = io.load_safetensors(out / "directions.safetensors")
    return meta, tensors


def test_directions_come_from_the_refused_prompts_only(setup, tmp_path):
    work, model, tables = setup
    config = _settings(model, refused_only=True)
    typed = rs.typed("directions", rs.settings(config, "directions"))
    lm = session.open_model(typed)
    raw, texts = session.chats(typed, lm.tokenizer, str(tables["harmful"]), "train")
    no_marker = EvalSettings(6, 4, refusal.RefusalDetector(["zzzz"]), cuda_graphs=False)
    answers = measure(lm.model, lm.tokenizer, no_marker, harmful=texts).responses
    # a marker some of the random model's answers hold as a word and others do not
    words = sorted({w for a in answers for w in re.findall(r"\w+", refusal.normalise(a))})
    splits = {w: [refusal.RefusalDetector([w]).is_refusal(a) for a in answers] for w in words}
    marker = max((w for w, flags in splits.items() if 0 < sum(flags) < len(flags)),
                 key=lambda w: sum(splits[w]), default=None)
    if marker is None:
        pytest.skip("the tiny model's answers share no word that splits them")
    config["evaluation"]["markers"] = [marker]
    meta, tensors = _run(config, tables, tmp_path / "refused")
    keep = [t for t, refused in zip(texts, splits[marker]) if refused]
    assert meta["refused_only"] is True and meta["harmful_kept"] == "refused"
    assert meta["n_harmful"] == len(keep) and meta["n_harmful_train"] == len(texts)
    assert meta["kept_sha256"] == io.sha256_texts([p for p, r in zip(raw, splits[marker]) if r])
    _, harmless = session.chats(typed, lm.tokenizer, str(tables["harmless"]), "train")
    expected = compute_directions(residuals.collect_residuals(lm.model, lm.tokenizer, keep, 4),
                                  residuals.collect_residuals(lm.model, lm.tokenizer, harmless, 4),
                                  n_directions=config["directions"]["n_directions"])
    torch.testing.assert_close(tensors["directions"], expected["directions"])
    torch.testing.assert_close(tensors["harmless_mean"], expected["harmless_mean"])
    everything = _run(_settings(model, refused_only=False), tables, tmp_path / "all")[1]
    assert not torch.equal(tensors["harmful_mean"], everything["harmful_mean"])


def test_a_model_that_refuses_nothing_falls_back_to_every_prompt_with_a_warning(setup, tmp_path, caplog):
    work, model, tables = setup
    config = _settings(model, refused_only=True)
    config["evaluation"]["markers"] = ["zzzz"]
    with caplog.at_level(logging.WARNING, logger="abliterate.steps.directions"):
        meta, tensors = _run(config, tables, tmp_path / "none")
    assert "refuses none of the" in caplog.text and "directions come from all of them" in caplog.text
    assert meta["harmful_kept"] == "all" and meta["n_harmful"] == len(PROMPTS)
    off_meta, off = _run(_settings(model, refused_only=False), tables, tmp_path / "off")
    assert off_meta["refused_only"] is False and "harmful_kept" not in off_meta
    torch.testing.assert_close(tensors["directions"], off["directions"], rtol=0, atol=0)


def test_the_switch_off_keeps_the_names_and_the_verdict_out_of_the_directions_rule(setup):
    _, model, _ = setup
    off = _settings(model, refused_only=False)
    assert set(rs.settings(off, "directions")["evaluation"].values()) == {None}
    budget = copy.deepcopy(off)
    budget["evaluation"]["max_new_tokens"] = 3
    assert rs.settings(budget, "directions") == rs.settings(off, "directions")
    assert rs.fingerprint(budget, "directions") == rs.fingerprint(off, "directions")
    on = _settings(model, refused_only=True)
    assert rs.fingerprint(on, "directions") != rs.fingerprint(off, "directions")
    assert rs.study_name(on) != rs.study_name(off)
    on_budget = copy.deepcopy(on)
    on_budget["evaluation"]["max_new_tokens"] = 3
    assert rs.fingerprint(on_budget, "directions") != rs.fingerprint(on, "directions")
    graphs = copy.deepcopy(on)
    graphs["evaluation"]["cuda_graphs"] = True
    assert rs.fingerprint(graphs, "directions") == rs.fingerprint(on, "directions")
