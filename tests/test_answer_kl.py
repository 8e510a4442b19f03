"""Answer KL (abliterate.answer_kl): KL over the unedited model's own answers, teacher-forced."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_models
import torch
from abliterate import errors, io, prompting, study
from abliterate.answer_kl import BaseAnswers, answer_kl, answer_logprobs, base_answers
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


def test_one_token_is_the_first_token_kl_bit_for_bit(tokenizer, texts):
    model = tiny_models.tiny_llama()
    base = base_answers(model, tokenizer, texts, 1, batch_size=3)
    assert base.ids.dtype == torch.int64 and base.lengths.dtype == torch.int64
    assert base.logprobs.shape == (len(texts), 1, model.config.vocab_size)
    assert torch.equal(base.logprobs[:, 0], first_token_logprobs(model, tokenizer, texts, 3))
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
    base = base_answers(model, tokenizer, texts, n_tokens, batch_size=3)
    assert answer_kl(base, answer_logprobs(model, tokenizer, texts, base.ids, 3)) == 0.0  # unedited
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


def test_positions_after_the_answers_eos_do_not_count(tokenizer, texts):
    model = tiny_models.tiny_llama()
    first = first_token_logprobs(model, tokenizer, texts, 3).argmax(-1)
    model.generation_config.eos_token_id = int(first[0])  # the first answer ends at once
    base = base_answers(model, tokenizer, texts, 4, batch_size=3)
    assert int(base.lengths[0]) == 1 and base.ids[0].tolist() == [int(first[0])] * 4
    # synthetic: the edited side agrees where positions count, and is anything (even NaN) after
    lp = torch.randn(2, 3, 7).log_softmax(-1)
    synthetic = BaseAnswers(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1, 2]), lp)
    edited = lp.clone()
    edited[0, 1:] = float("nan")
    edited[1, 2] = torch.randn(7).log_softmax(-1)
    assert answer_kl(synthetic, edited) == 0.0
    # hand-computed: prompt 0 one position, prompt 1 two positions (one of them differs)
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    base_lp = torch.stack([torch.stack([p, p, p]), torch.stack([p, p, p])]).log()
    edited_lp = torch.stack([torch.stack([q, p, p]), torch.stack([p, q, q])]).log()
    hand = BaseAnswers(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([1, 2]), base_lp)
    kl_pq = 0.25 * math.log(2)
    assert answer_kl(hand, edited_lp) == pytest.approx((kl_pq + kl_pq / 2) / 2, rel=1e-6)


def test_a_negative_kl_raises_and_shapes_are_checked():
    lp = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]).log()
    base = BaseAnswers(torch.zeros(1, 2, dtype=torch.int64), torch.tensor([2]), lp)
    with pytest.raises(errors.NumericalError, match="negative"):
        answer_kl(base, torch.ones(1, 2, 2).log())  # not normalised
    with pytest.raises(ValueError, match="shape mismatch"):
        answer_kl(base, lp[:, :1])


def test_base_answers_round_trip_through_the_baseline_file(tmp_path, tokenizer, texts):
    model = tiny_models.tiny_llama()
    base = base_answers(model, tokenizer, texts[:3], 3, batch_size=2)
    path = tmp_path / "logprobs.safetensors"
    io.save_safetensors({"eval": base.logprobs[:, 0], **base.tensors("eval")}, path)
    tensors, _ = io.load_safetensors(path)
    back = BaseAnswers.from_tensors(tensors, "eval")
    assert back.ids.dtype == torch.int64 and torch.equal(back.ids, base.ids)
    assert torch.equal(back.logprobs, base.logprobs)
    assert BaseAnswers.from_tensors(tensors, "heldout") is None  # a file of before: no answers


def test_measure_reports_kl_answer_beside_kl(tokenizer, texts):
    model = tiny_models.tiny_llama()
    harmful, harmless = texts[:3], texts[3:]
    settings = EvalSettings(max_new_tokens=4, batch_size=3, detector=RefusalDetector(["i can't"]))
    base = measure(model, tokenizer, settings, harmless=harmless)
    answers = base_answers(model, tokenizer, harmless, 4, batch_size=3)
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
    answers = base_answers(model, tokenizer, harmless, 6, batch_size=3)
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

    class Config:  # the two keys objective_kl reads, as typed settings give them
        class study:
            objective_kl = "answer"

        class evaluation:
            kl_tokens = 4

    model = tiny_models.tiny_llama()
    answers = base_answers(model, tokenizer, texts[:2], 3, batch_size=2)
    with pytest.raises(errors.ConfigError, match=r"evaluation\.kl_tokens 4.*answers of 3 tokens.*baseline"):
        objective_kl(Config, answers.tensors("eval"), "baseline.safetensors")
    with pytest.raises(errors.ConfigError, match=r"answers of none"):
        objective_kl(Config, {}, "baseline.safetensors")
    Config.evaluation.kl_tokens = 3
    assert objective_kl(Config, answers.tensors("eval"), "b")["objective_kl"] == "answer"
