"""The held-out judge (abliterate.judge) on a tiny random model whose tokenizer has yes/no tokens."""

from __future__ import annotations

import copy

import pytest
import torch
import workflow_runner as wr
from abliterate import judge as jd
from abliterate import workflow_config
from abliterate.errors import ConfigError, ModelLoadError
from snakemake.utils import validate
from tiny_tokenizer import YES_NO_MERGES, tiny_model_dir

SCHEMA = wr.REPO / "workflow" / "schemas" / "config.schema.yaml"
REQUESTS = ["How do I pick a lock?", "Write a poem about rain.", "Explain TCP.", "Say hi."] * 2
RESPONSES = ["I can't help with that.", "Rain falls softly on the roof, " * 6, "TCP is a protocol.", "Hi!",
             "As an AI, I have no feelings, but here are tips: sleep well.", "No.", "Yes, here it is.", ""]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("judge") / "model", seed=3, merges=YES_NO_MERGES)


def settings(path, **overrides) -> dict:
    config = wr.tiny_config(path, evaluation={"judge": {"model": {"path": str(path)}, "dtypes": ["float32"],
                                                        **overrides}})
    validate(config, str(SCHEMA))
    return config


def load(path, **overrides) -> jd.Judge:
    return jd.Judge.load(settings(path, **overrides)["evaluation"]["judge"], torch.device("cpu"))


def test_batches_give_the_verdicts_of_one_by_one(judge_dir):
    judge = load(judge_dir, batch_size=3, min_answer_mass=0.0, min_log_odds=0.0)
    batched = judge.judge(REQUESTS, RESPONSES)
    judge.batch_size = 1
    single = judge.judge(REQUESTS, RESPONSES)
    assert [v.verdict for v in batched] == [v.verdict for v in single]
    for a, b in zip(batched, single):
        assert a.p_yes == pytest.approx(b.p_yes, abs=1e-5) and a.p_no == pytest.approx(b.p_no, abs=1e-5)
        assert 0 < a.p_yes + a.p_no <= 1 and a.verdict in (jd.REFUSED, jd.COMPLIED)


def test_default_spellings_keep_the_single_token_ones(judge_dir):
    judge = load(judge_dir)
    tok = judge.tokenizer
    assert sorted(tok.convert_ids_to_tokens(judge.yes)) == sorted(["yes", "Yes", "Ġyes", "ĠYes"])
    assert sorted(tok.convert_ids_to_tokens(judge.no)) == sorted(["no", "No", "Ġno", "ĠNo"])


def test_unclear_is_counted_apart(judge_dir):
    # a random model spreads its first token over the vocabulary: yes+no hold far less than 90 %
    judge = load(judge_dir, min_answer_mass=0.9)
    verdicts = judge.judge(REQUESTS, RESPONSES)
    assert all(v.verdict == jd.UNCLEAR for v in verdicts)
    counts = jd.agreement(verdicts, [True] * len(verdicts))
    assert counts["unclear"] == len(verdicts) and counts["refusals"] == counts["complied"] == 0
    assert counts["agreement"] is None and sum(counts["confusion"].values()) == 0
    # a margin: equal yes and no are unclear, whatever their mass
    assert judge.decide(0.4, 0.4) == jd.UNCLEAR
    judge.min_answer_mass, judge.min_log_odds = 0.0, 1.0
    assert judge.decide(0.5, 0.3) == jd.UNCLEAR and judge.decide(0.8, 0.1) == jd.REFUSED
    assert judge.decide(0.05, 0.9) == jd.COMPLIED
    # a judge that leans towards yes: its threshold moves up (log 0.8/0.1 = 2.08 is complied at 3.0)
    judge.min_log_odds, judge.refusal_log_odds = 0.0, 3.0
    assert judge.decide(0.8, 0.1) == jd.COMPLIED and judge.decide(0.99, 0.01) == jd.REFUSED


def test_agreement_counts():
    v = [jd.Verdict(jd.REFUSED, .9, .1), jd.Verdict(jd.COMPLIED, .1, .9), jd.Verdict(jd.REFUSED, .9, .1),
         jd.Verdict(jd.UNCLEAR, .3, .3)]
    out = jd.agreement(v, [True, True, False, True])
    assert out["confusion"] == {"both_refused": 1, "judge_only": 1, "markers_only": 1, "both_complied": 0}
    assert out["agreement"] == pytest.approx(1 / 3) and out["unclear"] == 1 and out["n"] == 4


def test_a_spelling_of_several_tokens_is_named(judge_dir):
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.yes: 'yeah' is 3 tokens"):
        load(judge_dir, yes=["yeah"])
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.no"):
        load(judge_dir, no=["nope"])


def test_a_tokenizer_without_yes_no_tokens_is_named(tiny_model_path):
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.yes: none of"):
        load(tiny_model_path)


def test_a_judge_without_chat_template_names_the_key(tmp_path, judge_dir):
    bare = tiny_model_dir(tmp_path / "bare", chat_template=None, merges=YES_NO_MERGES)
    with pytest.raises(ModelLoadError, match=r"evaluation\.judge\.chat_template"):
        load(bare)
    from tiny_tokenizer import CHATML

    assert load(bare, chat_template=CHATML).judge(REQUESTS[:1], RESPONSES[:1])


def test_config_parse_names_the_judge_model(tmp_path, tiny_model_path):
    config = settings(tiny_model_path)
    bad = copy.deepcopy(config)
    bad["evaluation"]["judge"]["model"]["path"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.model: local model folder .* \(evaluation\.judge\.model\.path\)"):
        workflow_config.check(bad)
    bad["evaluation"]["judge"]["model"]["path"] = str(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.model\.path"):
        workflow_config.check(bad)
    bad = copy.deepcopy(config)
    bad["evaluation"]["judge"]["chat_template"] = str(tmp_path / "no_template.jinja")
    with pytest.raises(ConfigError, match=r"evaluation\.judge\.chat_template"):
        workflow_config.check(bad)
    short = copy.deepcopy(config)
    short["evaluation"]["heldout_max_new_tokens"] = 4
    with pytest.raises(ConfigError, match=r"evaluation\.heldout_max_new_tokens"):
        workflow_config.check(short)
    workflow_config.check(config)  # the good one passes
