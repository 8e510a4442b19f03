"""Rule `study`: one worker of the Optuna study. Each trial applies an ablation, counts refusals
on the eval harmful prompts, measures the KL of ``study.objective_kl`` (first-token, or over the
unmodified model's answers) on the eval harmless prompts, and resets."""

from __future__ import annotations

import logging
import time

from .. import (
    ablation,
    architecture,
    devices,
    directions,
    editors,
    io,
    session,
    study,
    study_storage,
)
from ..answer_kl import BaseAnswers
from ..errors import ConfigError
from ..evaluation import Evaluator
from ..rule_settings import typed
from .common import eval_settings

log = logging.getLogger(__name__)


def search_space(space, kinds: list[str]) -> dict:
    """The configured search space (config study.space, shared by every component kind) in the form
    study.suggest_params takes."""
    low, high = space["direction_index"]
    scopes = list(space.get("direction_scope", study.SCOPES))
    kernel = {key: list(space[key]) for key in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")}
    return {
        "direction_index": {"low": low, "high": high, "relative": True, "scopes": scopes},
        "components": {kind: dict(kernel) for kind in kinds},
        "n_directions": list(space.get("n_directions", [1, 1])),
        "secondary_weight": list(space.get("secondary_weight", [0.0, 1.0])),
    }


class Objective:
    """Apply → score → reset, one trial at a time, on one loaded model."""

    def __init__(self, editor: editors.Editor, evaluator: Evaluator):
        self.editor = editor
        self.evaluator = evaluator

    def __call__(self, params: dict, number: int, refusal_cap=None) -> dict:
        """``refusal_cap``: see :func:`abliterate.study.refusal_cap` (the study's stop_dominated)."""
        start = time.perf_counter()
        self.editor.apply(ablation.AblationParams.from_flat(params))
        try:
            scores = self.evaluator.score(first_edited=self.editor.first_edited_layer,
                                          refusal_cap=refusal_cap)
        finally:
            self.editor.reset()
        seconds = scores.pop("seconds")
        return {**scores, "seconds_apply_reset": time.perf_counter() - start - seconds,
                "seconds_evaluate": seconds}


def build_editor(config, lm, directions_path: str, route: str | None = None, n_directions: int = 1) -> editors.Editor:
    """The config's editor of ``lm`` with the directions rule's table; ``route`` overrides
    ``ablation.route`` (export needs LoRA adapters to write); ``n_directions``: the most directions a
    trial will ablate (the adapter's rank covers them)."""
    table, sets = directions.read(directions_path, n_directions)
    return editors.make_editor(
        lm.model, architecture.discover(lm.model), table, route or config.ablation.route,
        row_norm=ablation.RowNorm(config.ablation.row_norm), full_rank=config.ablation.full_rank, seed=config.seed,
        direction_sets=sets, n_directions=n_directions,
    )


def objective_kl(config, base: dict, baseline_path: str) -> dict:
    """The :class:`Evaluator` arguments of ``study.objective_kl`` on the eval split."""
    if config.study.objective_kl == "first_token":
        return {}
    answers = BaseAnswers.from_tensors(base, "eval", baseline_path)
    if answers is None or answers.n_tokens != config.evaluation.kl_tokens:
        found = "none" if answers is None else f"{answers.n_tokens} tokens"
        raise ConfigError(f"study.objective_kl is answer with evaluation.kl_tokens {config.evaluation.kl_tokens}, "
                          f"but {baseline_path} holds answers of {found}: rerun the baseline rule")
    top_k = min(config.evaluation.kl_top_k, int(answers.first.shape[-1]))
    if answers.n_tokens > 1 and answers.top_k != top_k:
        raise ConfigError(f"study.objective_kl is answer with evaluation.kl_top_k {config.evaluation.kl_top_k}, "
                          f"but {baseline_path} holds the top {answers.top_k} tokens per position: rerun the "
                          "baseline rule")
    return {"base_answers": answers, "objective_kl": "answer"}


def build_objective(config, lm, harmful: str, harmless: str, directions_path: str, baseline_path: str,
                    reuse_layers: bool = False):
    """``reuse_layers`` records the prefills every trial repeats (worth it for a study, not for one edit)."""
    editor = build_editor(config, lm, directions_path, n_directions=int(config.study.space["n_directions"][1]))
    layout = editor.layout
    device = next(lm.model.parameters()).device
    _, harmful_texts = session.chats(config, lm.tokenizer, harmful, "eval")
    settings = eval_settings(config.evaluation, lm, harmful_texts)
    base, _ = io.load_safetensors(baseline_path, device=device)
    _, harmless_texts = session.chats(config, lm.tokenizer, harmless, "eval")
    evaluator = Evaluator(editor.model, lm.tokenizer, harmful_texts, harmless_texts, base["eval"],
                          settings.max_new_tokens, settings.batch_size, settings.detector,
                          reuse_layers=reuse_layers, cuda_graphs=settings.cuda_graphs,
                          **objective_kl(config, base, baseline_path))
    objective = Objective(editor, evaluator)
    return objective, layout, editor


def run(config: dict, worker: int, harmful: str, harmless: str, directions_path: str, baseline_path: str,
        storage: str, study_name: str, n_trials: int, out_done: str, config_hash: str,
        ledger: str | None = None) -> dict:
    config = typed("study", config)
    devices.use_worker_gpu(worker)
    lm = session.open_model(config)
    objective, layout, _ = build_objective(config, lm, harmful, harmless, directions_path, baseline_path,
                                           reuse_layers=True)
    kinds = sorted({c.kind for c in layout.components})
    with study_storage.connection_errors(storage):
        result = study.run_worker(
            storage, study_name, objective, n_trials, worker_id=worker, seed=config.seed + worker,
            sampler_kwargs={"n_startup_trials": config.study.n_startup_trials,
                            "n_ei_candidates": config.study.n_ei_candidates},
            n_layers=layout.n_layers, space=search_space(config.study.space, kinds),
            stop_dominated=config.study.stop_dominated, ledger=ledger,
            refusal_constraint=config.study.refusal_constraint,
        )
    io.write_json({**result, "worker": worker, "study_name": study_name, "config_hash": config_hash,
                   **lm.metadata()}, out_done)
    del objective, lm
    devices.free_memory()
    return result


def write_trials(storage: str, study_name: str, out_table: str, ledger: str | None = None) -> None:
    """Rule `trials`: the study's trials as one CSV table."""
    with study_storage.connection_errors(storage):
        df = study.trials_frame(storage, study_name, ledger)
    io.write_csv(df, out_table)
    log.info("wrote %s: %d trials (%d complete)", out_table, len(df), int((df["state"] == "COMPLETE").sum()))
