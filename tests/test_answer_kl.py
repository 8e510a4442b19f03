"""Answer KL (abliterate.answer_kl): KL over the unedited model's own answers, teacher-forced."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from abliterate import errors, io, prompting, study
from abliterate.answer_kl import (
    BaseAnswers,
    answer_kl,
    answer_logprobs,
    base_answers,
    tail_logprobs,
)
from abliterate.architecture import discover
from abliterate.directions import compute_directions
from abliterate.editors import InPlaceEditor
from abliterate.evaluation import EvalSettings, Evaluator, measure
from abliterate.kl import first_token_logprobs, kl_divergence
from abliterate.refusal import RefusalDetector
from abliterate.residuals import collect_residuals
from abliterate.steps.study import Objective
from optuna.trial import TrialState
from study_space import SPACE
from test_generation import PROMPTS
from tiny_tokenizer import char_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer):
    return prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")


def _edit(model) -> None:
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)


def _store(lp: torch.Tensor, lengths: torch.Tensor, top_k: int | None = None) -> BaseAnswers:
    """BaseAnswers of full (n, N, vocab) base log-probabilities, the top ``top_k`` (default: all) kept."""
    later = lp[:, 1:]
    values, ids = torch.topk(later, top_k or lp.shape[-1], dim=-1)
    return BaseAnswers(torch.zeros(lp.shape[:2], dtype=torch.int64), lengths, lp[:, 0], values, ids,
                       tail_logprobs(later, ids))


def _exact_answer_kl(base_lp: torch.Tensor, edited_lp: torch.Tensor, lengths: torch.Tensor) -> float:
    """The answer KL as it was before the top-k store: over the whole vocabulary at every position."""
    per_position = F.kl_div(edited_lp, base_lp, reduction="none", log_target=True).sum(dim=-1)
    counted = torch.arange(base_lp.shape[1]) < lengths[:, None]
    return float((torch.where(counted, per_position, 0.0).sum(dim=-1) / counted.sum(dim=-1)).mean())


def _full_base(model, tokenizer, texts, answers: BaseAnswers) -> torch.Tensor:
    """The base log-probabilities over the whole vocabulary, position 0 from the first-token store."""
    full = answer_logprobs(model, tokenizer, texts, answers.ids, 3)
    return torch.cat([answers.first[:, None], full[:, 1:]], dim=1)


def test_one_token_is_the_first_token_kl_bit_for_bit(tokenizer, texts):
    model = tiny_models.tiny_llama()
    base = base_answers(model, tokenizer, texts, 1, batch_size=3, top_k=4)
    assert base.ids.dtype == torch.int64 and base.lengths.dtype == torch.int64
    assert base.first.shape == (len(texts), model.config.vocab_size)
    assert base.top_ids.shape == (len(texts), 0, 4) and base.top_ids.dtype == torch.int64
    assert torch.equal(base.first, first_token_logprobs(model, tokenizer, texts, 3))
    first_base = first_token_logprobs(model, tokenizer, texts, 3)
    _edit(model)
    edited = answer_logprobs(model, tokenizer, texts, base.ids, 3)
    assert torch.equal(edited[:, 0], first_token_logprobs(model, tokenizer, texts, 3))
    expected = kl_divergence(first_base, first_token_logprobs(model, tokenizer, texts, 3))
    assert expected > 1e-6
    assert answer_kl(base, edited) == expected  # exactly


def test_hand_computed_on_a_tiny_model(tokenizer, texts):
    model = tiny_models.tiny_llama()
    n_tokens = 5
    base = base_answers(model, tokenizer, texts, n_tokens, batch_size=3, top_k=model.config.vocab_size)
    # unedited: position 0's base is the prompt-only forward, the edited side the teacher-forced one
    assert answer_kl(base, answer_logprobs(model, tokenizer, texts, base.ids, 3)) == pytest.approx(0.0, abs=1e-7)
    edited_model = copy.deepcopy(model)
    _edit(edited_model)
    got = answer_kl(base, answer_logprobs(edited_model, tokenizer, texts, base.ids, 4))
    per_prompt = []
    with torch.inference_mode():
        for i, text in enumerate(texts):
            prompt = prompting.encode(tokenizer, [text], "cpu")["input_ids"][0]
            ids = torch.cat([prompt, base.ids[i, : n_tokens - 1]])[None]
            p = model(input_ids=ids).logits[0, -n_tokens:].float().log_softmax(-1)
            q = edited_model(input_ids=ids).logits[0, -n_tokens:].float().log_softmax(-1)
            count = int(base.lengths[i])
            kl = [float((p[j].exp() * (p[j] - q[j])).sum()) for j in range(count)]
            per_prompt.append(sum(kl) / count)
    assert got == pytest.approx(sum(per_prompt) / len(per_prompt), rel=1e-4)
    assert got > 0


def test_a_top_k_of_the_vocabulary_is_the_exact_answer_kl(tokenizer, texts):
    model = tiny_models.tiny_llama()
    vocab = model.config.vocab_size
    base = base_answers(model, tokenizer, texts, 6, batch_size=3, top_k=vocab + 100)
    assert base.top_k == vocab and torch.isneginf(base.tail).all()  # every token stored: no rest
    assert base.mean_tail_mass() == 0.0
    base_lp = _full_base(model, tokenizer, texts, base)
    _edit(model)
    edited = answer_logprobs(model, tokenizer, texts, base.ids, 3)
    exact = _exact_answer_kl(base_lp, edited, base.lengths)
    assert exact > 1e-4
    assert answer_kl(base, edited) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("top_k", [1, 3, 16])
def test_a_small_top_k_gives_a_lower_bound_of_the_exact_kl(tokenizer, texts, top_k):
    model = tiny_models.tiny_llama()
    base = base_answers(model, tokenizer, texts, 6, batch_size=3, top_k=top_k)
    assert base.top_logprobs.shape == (len(texts), 5, top_k) and base.tail.shape == (len(texts), 5)
    tail = base.mean_tail_mass()
    assert 0 < tail < 1
    # the stored tail is the base's mass outside the stored tokens
    base_lp = _full_base(model, tokenizer, texts, base)
    kept = base_lp[:, 1:].gather(-1, base.top_ids)
    assert base.top_logprobs.equal(kept)
    assert base.tail.exp() == pytest.approx(1 - kept.exp().sum(-1), abs=1e-6)
    _edit(model)
    edited = answer_logprobs(model, tokenizer, texts, base.ids, 3)
    exact = _exact_answer_kl(base_lp, edited, base.lengths)
    coarse = answer_kl(base, edited)
    assert 0 <= coarse < exact


def test_positions_after_the_answers_eos_do_not_count(tokenizer, texts):
    model = tiny_models.tiny_llama()
    first = first_token_logprobs(model, tokenizer, texts, 3).argmax(-1)
    model.generation_config.eos_token_id = int(first[0])  # the first answer ends at once
    base = base_answers(model, tokenizer, texts, 4, batch_size=3, top_k=8)
    assert int(base.lengths[0]) == 1 and base.ids[0].tolist() == [int(first[0])] * 4
    # synthetic: the edited side agrees where positions count, and is anything (even NaN) after
    lp = torch.randn(2, 3, 7).log_softmax(-1)
    edited = lp.clone()
    edited[0, 1:] = float("nan")
    edited[1, 2] = torch.randn(7).log_softmax(-1)
    for top_k in (2, 7):
        assert answer_kl(_store(lp, torch.tensor([1, 2]), top_k), edited) == 0.0
    # hand-computed: prompt 0 one position, prompt 1 two positions (one of them differs)
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    base_lp = torch.stack([torch.stack([p, p, p]), torch.stack([p, p, p])]).log()
    edited_lp = torch.stack([torch.stack([q, p, p]), torch.stack([p, q, q])]).log()
    kl_pq = 0.25 * math.log(2)
    assert answer_kl(_store(base_lp, torch.tensor([1, 2])), edited_lp) == pytest.approx((kl_pq + kl_pq / 2) / 2,
                                                                                        rel=1e-6)
    # top 1 at position 1: buckets {0} and {1, 2}, (0.5, 0.5) against (0.25, 0.75)
    coarse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert answer_kl(_store(base_lp, torch.tensor([1, 2]), 1), edited_lp) == pytest.approx(
        (kl_pq + coarse / 2) / 2, rel=1e-6)


def test_a_negative_kl_raises_and_shapes_are_checked():
    lp = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]).log()
    base = _store(lp, torch.tensor([2]))
    with pytest.raises(errors.NumericalError, match="negative"):
        answer_kl(base, torch.ones(1, 2, 2).log())  # not normalised
    with pytest.raises(ValueError, match="shape mismatch"):
        answer_kl(base, lp[:, :1])


def _answer_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if name.startswith("answer_"))


def test_base_answers_round_trip_through_the_baseline_file(tmp_path, tokenizer, texts):
    model = tiny_models.tiny_llama()
    base = base_answers(model, tokenizer, texts[:3], 3, batch_size=2, top_k=5)
    path = tmp_path / "logprobs.safetensors"
    io.save_safetensors({"eval": base.first, **base.tensors("eval")}, path)
    tensors, _ = io.load_safetensors(path)
    back = BaseAnswers.from_tensors(tensors, "eval")
    assert back.ids.dtype == torch.int64 and torch.equal(back.ids, base.ids)
    assert back.top_ids.dtype == torch.int64 and torch.equal(back.top_ids, base.top_ids)
    assert torch.equal(back.first, base.first) and torch.equal(back.top_logprobs, base.top_logprobs)
    assert torch.equal(back.tail, base.tail)
    assert BaseAnswers.from_tensors(tensors, "heldout") is None  # a file of before: no answers
    # the layout before kl_top_k (the whole vocabulary per position) names the rule to rerun
    old = {"eval": base.first, "answer_ids.eval": base.ids, "answer_lengths.eval": base.lengths,
           "answer_logprobs.eval": torch.zeros(3, 3, model.config.vocab_size)}
    with pytest.raises(errors.ConfigError, match=r"whole vocabulary.*kl_top_k.*rerun the baseline rule"):
        BaseAnswers.from_tensors(old, "eval", "b.safetensors")


def test_the_stored_bytes_grow_with_k_not_with_the_vocabulary(tmp_path, tokenizer, texts):
    model = tiny_models.tiny_llama()
    n, n_tokens = len(texts), 6
    sizes = {}
    for top_k in (4, 8):
        base = base_answers(model, tokenizer, texts, n_tokens, batch_size=3, top_k=top_k)
        stored = base.tensors("eval")
        # per prompt: ids, length, and per later position k values, k ids and the tail
        assert _answer_bytes(stored) == n * (8 * n_tokens + 8 + (n_tokens - 1) * (12 * top_k + 4))
        path = tmp_path / f"k{top_k}.safetensors"
        io.save_safetensors({"eval": base.first, **stored}, path)
        sizes[top_k] = path.stat().st_size
    grown = sizes[8] - sizes[4]
    assert abs(grown - n * (n_tokens - 1) * 4 * 12) < 64  # the header's digits aside
    assert sizes[4] < n * model.config.vocab_size * 4 + n * n_tokens * model.config.vocab_size * 4 / 2


def test_kl_top_k_below_one_is_refused():
    from snakemake.utils import validate

    schema = str(Path(__file__).parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    with pytest.raises(Exception, match=r"kl_top_k"):
        validate({"evaluation": {"kl_top_k": 0}}, schema)
    config = {"evaluation": {}}
    validate(config, schema)
    assert config["evaluation"]["kl_top_k"] == 256
    with pytest.raises(ValueError, match=r"evaluation\.kl_top_k"):
        base_answers(tiny_models.tiny_llama(), char_tokenizer(), ["a"], 2, batch_size=1, top_k=0)


def test_measure_reports_kl_answer_beside_kl(tokenizer, texts):
    model = tiny_models.tiny_llama()
    harmful, harmless = texts[:3], texts[3:]
    settings = EvalSettings(max_new_tokens=4, batch_size=3, detector=RefusalDetector(["i can't"]))
    base = measure(model, tokenizer, settings, harmless=harmless)
    answers = base_answers(model, tokenizer, harmless, 4, batch_size=3, top_k=16)
    _edit(model)
    found = measure(model, tokenizer, settings, harmful, harmless, base.logprobs, base_answers=answers)
    counts = found.counts()
    assert set(counts) == {"refusals", "n", "kl", "kl_answer"}
    assert counts["kl"] > 0 and counts["kl_answer"] > 0
    assert set(measure(model, tokenizer, settings, harmful, harmless, base.logprobs).counts()) == {
        "refusals", "n", "kl"}


def _study(tmp_path, tokenizer, texts, objective_kl: str, reuse_layers: bool):
    harmful, harmless = texts[:5], texts[4:]
    detector = RefusalDetector(["ue{wxf", "me{wxf", "mee{wx"])
    model = tiny_models.tiny_llama()
    base = measure(model, tokenizer, EvalSettings(8, 3, detector), harmless=harmless)
    answers = base_answers(model, tokenizer, harmless, 6, batch_size=3, top_k=16)
    directions = compute_directions(
        collect_residuals(model, tokenizer, harmful, 3, progress=False),
        collect_residuals(model, tokenizer, harmless, 3, progress=False),
    )["directions"]
    editor = InPlaceEditor(model, discover(model), directions)
    evaluator = Evaluator(editor.model, tokenizer, harmful, harmless, base.logprobs, 8, 3, detector,
                          reuse_layers=reuse_layers, base_answers=answers, objective_kl=objective_kl)
    assert (evaluator._leading is not None) == reuse_layers  # the teacher-forced prefills are recorded
    url = f"sqlite:///{tmp_path / f'{objective_kl}-{reuse_layers}.sqlite'}"
    study.run_worker(url, "s", Objective(editor, evaluator), 4, seed=42, n_layers=tiny_models.LAYERS,
                     sampler_kwargs={"n_startup_trials": 2}, stop_dominated=True, progress=False,
                     heartbeat_interval=None, space=SPACE)
    import optuna

    trials = optuna.load_study(study_name="s", storage=url).get_trials(states=[TrialState.COMPLETE])
    return [(t.user_attrs["ablation_params"], t.values[0], t.values[1]) for t in trials]


def test_a_study_on_the_answer_kl_runs_end_to_end(tmp_path, tokenizer, texts):
    replayed = _study(tmp_path, tokenizer, texts, "answer", reuse_layers=True)
    assert len(replayed) == 4 and all(kl >= 0 and math.isfinite(kl) for *_, kl in replayed)
    assert any(kl > 0 for *_, kl in replayed)
    # the recorded leading layers give the teacher-forced forward's values, trial by trial
    full = _study(tmp_path, tokenizer, texts, "answer", reuse_layers=False)
    assert [p for p, *_ in full] == [p for p, *_ in replayed]
    assert [kl for *_, kl in full] == pytest.approx([kl for *_, kl in replayed], rel=1e-3, abs=1e-7)


def test_the_evaluator_needs_answers_for_the_answer_objective(tokenizer, texts):
    model = tiny_models.tiny_llama()
    lp = first_token_logprobs(model, tokenizer, texts[3:], 3)
    with pytest.raises(ValueError, match="base_answers"):
        Evaluator(model, tokenizer, texts[:3], texts[3:], lp, 4, 3, objective_kl="answer")
    with pytest.raises(ValueError, match="first_token or answer"):
        Evaluator(model, tokenizer, texts[:3], texts[3:], lp, 4, 3, objective_kl="answers")


def test_the_study_refuses_a_baseline_without_the_configured_answers(tmp_path, tokenizer, texts):
    from abliterate.steps.study import objective_kl

    class Config:  # the keys objective_kl reads, as typed settings give them
        class study:
            objective_kl = "answer"

        class evaluation:
            kl_tokens = 4
            kl_top_k = 16

    model = tiny_models.tiny_llama()
    answers = base_answers(model, tokenizer, texts[:2], 3, batch_size=2, top_k=16)
    stored = {"eval": answers.first, **answers.tensors("eval")}
    with pytest.raises(errors.ConfigError, match=r"evaluation\.kl_tokens 4.*answers of 3 tokens.*baseline"):
        objective_kl(Config, stored, "baseline.safetensors")
    with pytest.raises(errors.ConfigError, match=r"answers of none"):
        objective_kl(Config, {}, "baseline.safetensors")
    Config.evaluation.kl_tokens = 3
    assert objective_kl(Config, stored, "b")["objective_kl"] == "answer"
    Config.evaluation.kl_top_k = 32
    with pytest.raises(errors.ConfigError, match=r"evaluation\.kl_top_k 32.*top 16 tokens.*rerun the baseline"):
        objective_kl(Config, stored, "baseline.safetensors")
    Config.evaluation.kl_top_k = 10_000  # beyond the vocabulary: the whole of it, as stored
    full = base_answers(model, tokenizer, texts[:2], 3, batch_size=2, top_k=10_000)
    assert objective_kl(Config, {"eval": full.first, **full.tensors("eval")}, "b")["objective_kl"] == "answer"
