"""A short study on a tiny model, pinned trial by trial: the study is deterministic per seed, so a
change to the trial engine that changes any sampled point, refusal count or KL shows here first."""

from __future__ import annotations

import optuna
import pytest
import tiny_models as tm
import torch
from abliterate import prompting, study
from abliterate.architecture import discover
from abliterate.directions import compute_directions
from abliterate.editors import InPlaceEditor
from abliterate.evaluation import EvalSettings, Evaluator, measure
from abliterate.refusal import RefusalDetector
from abliterate.residuals import collect_residuals
from abliterate.steps.study import Objective
from optuna.trial import TrialState
from study_space import SPACE
from test_generation import PROMPTS
from tiny_tokenizer import char_tokenizer

# (absolute ablation parameters rounded to 4 places, refusals, KL) per completed trial, seed 42.
GOLDEN: list[tuple] = [
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 1.0827,
            "attn_out.max_weight_position": 1.0455,
            "attn_out.min_weight": 0.2903,
            "attn_out.min_weight_distance": 0.7736,
            "mlp_down.max_weight": 1.1505,
            "mlp_down.max_weight_position": 0.9993,
            "mlp_down.min_weight": 0.6392,
            "mlp_down.min_weight_distance": 0.8117,
        },
        1,
        0.000118119,
    ),
    (
        {
            "direction_index": 0.5977,
            "attn_out.max_weight": 1.0356,
            "attn_out.max_weight_position": 1.8069,
            "attn_out.min_weight": 1.0307,
            "attn_out.min_weight_distance": 1.1606,
            "mlp_down.max_weight": 1.4691,
            "mlp_down.max_weight_position": 1.9555,
            "mlp_down.min_weight": 0.3975,
            "mlp_down.min_weight_distance": 1.1548,
        },
        2,
        7.94795e-05,
    ),
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 0.8043,
            "attn_out.max_weight_position": 1.7708,
            "attn_out.min_weight": 0.5669,
            "attn_out.min_weight_distance": 1.0508,
            "mlp_down.max_weight": 1.0524,
            "mlp_down.max_weight_position": 1.3618,
            "mlp_down.min_weight": 0.9962,
            "mlp_down.min_weight_distance": 0.9253,
        },
        5,
        2.03399e-05,
    ),
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 1.0011,
            "attn_out.max_weight_position": 1.5947,
            "attn_out.min_weight": 0.4566,
            "attn_out.min_weight_distance": 0.3329,
            "mlp_down.max_weight": 0.8982,
            "mlp_down.max_weight_position": 1.6321,
            "mlp_down.min_weight": 0.758,
            "mlp_down.min_weight_distance": 0.2499,
        },
        4,
        0.0,
    ),
    (
        {
            "direction_index": 1.3569,
            "attn_out.max_weight": 1.1807,
            "attn_out.max_weight_position": 1.2604,
            "attn_out.min_weight": 0.2418,
            "attn_out.min_weight_distance": 1.1791,
            "mlp_down.max_weight": 1.4068,
            "mlp_down.max_weight_position": 1.787,
            "mlp_down.min_weight": 0.0819,
            "mlp_down.min_weight_distance": 1.1645,
        },
        1,
        7.54778e-05,
    ),
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 0.8838,
            "attn_out.max_weight_position": 1.4497,
            "attn_out.min_weight": 0.2333,
            "attn_out.min_weight_distance": 0.2845,
            "mlp_down.max_weight": 1.0389,
            "mlp_down.max_weight_position": 1.9196,
            "mlp_down.min_weight": 0.1527,
            "mlp_down.min_weight_distance": 0.4584,
        },
        3,
        6.16802e-07,
    ),
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 1.1812,
            "attn_out.max_weight_position": 0.9438,
            "attn_out.min_weight": 0.2733,
            "attn_out.min_weight_distance": 0.5465,
            "mlp_down.max_weight": 0.8376,
            "mlp_down.max_weight_position": 1.8606,
            "mlp_down.min_weight": 0.0652,
            "mlp_down.min_weight_distance": 0.4014,
        },
        1,
        0.000173683,
    ),
    (
        {
            "direction_index": None,
            "attn_out.max_weight": 1.2992,
            "attn_out.max_weight_position": 1.2381,
            "attn_out.min_weight": 0.768,
            "attn_out.min_weight_distance": 0.428,
            "mlp_down.max_weight": 1.4587,
            "mlp_down.max_weight_position": 1.9327,
            "mlp_down.min_weight": 0.1116,
            "mlp_down.min_weight_distance": 0.5184,
        },
        1,
        0.000151281,
    ),
]


def _run_study(tmp_path) -> list[tuple]:
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    texts = prompting.chat_texts(tokenizer, PROMPTS, system_prompt="Be brief.")
    harmful, harmless = texts[:5], texts[4:]
    detector = RefusalDetector(["ue{wxf", "me{wxf", "mee{wx"])  # 4 of the 5 unedited answers
    model = tm.tiny_llama()
    base = measure(model, tokenizer, EvalSettings(8, 3, detector), harmful, harmless)
    directions = compute_directions(
        collect_residuals(model, tokenizer, harmful, 3, progress=False),
        collect_residuals(model, tokenizer, harmless, 3, progress=False),
    )["directions"]
    ablator = InPlaceEditor(model, discover(model), directions)
    evaluator = Evaluator(
        ablator.model,
        tokenizer,
        harmful,
        harmless,
        base.logprobs,
        8,
        3,
        detector,
        reuse_layers=True,
    )
    url = f"sqlite:///{tmp_path / 'study.sqlite'}"
    study.run_worker(
        url,
        "golden",
        Objective(ablator, evaluator),
        8,
        seed=42,
        n_layers=tm.LAYERS,
        sampler_kwargs={"n_startup_trials": 4},
        stop_dominated=True,
        progress=False,
        heartbeat_interval=None,
        space=SPACE,
    )
    trials = optuna.load_study(study_name="golden", storage=url).get_trials(
        states=[TrialState.COMPLETE]
    )
    return [
        (
            {
                k: v if isinstance(v, str) or v is None else round(v, 4)
                for k, v in t.user_attrs["ablation_params"].items()
                # recorded since several directions exist; the pinned study ablates one
                if not (k == "n_directions" and v == 1)
            },
            t.values[0],
            t.values[1],
        )
        for t in trials
    ]


def test_a_short_study_on_a_tiny_model_gives_the_pinned_trials(tmp_path):
    got = _run_study(tmp_path)
    if not GOLDEN:
        pytest.fail(f"GOLDEN = {got!r}")
    assert [(params, refusals) for params, refusals, _ in got] == [(p, r) for p, r, _ in GOLDEN]
    # abs: float32 rounding, which differs between CPUs' kernels (an AMD EPYC with AVX-512 gives
    # every KL here 1e-7 to 4e-7 below the pinned values, with the same sampled points and refusals)
    assert [kl for *_, kl in got] == pytest.approx([kl for *_, kl in GOLDEN], rel=1e-3, abs=1e-6)
