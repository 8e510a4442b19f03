"""What the sampler sees of a trial: below a KL target, KL becomes a refusal score; below a refusal
floor, refusals count as the floor.

Why. Trials that barely change the model (KL near 0, refusals near the baseline's) are on the
(refusals, KL) Pareto front, because nothing has a lower KL; multi-objective TPE takes its "good"
trials from the front, so it keeps sampling near them: a study spends trials on edits that do
nothing (on the demo the shipped studies' fronts had 4–6 such points, 26–38 refusals of 50 at KL
0.008–0.024). Heretic 1.4.0 replaces the KL objective below a target (its ``kl_divergence_target``,
0.01) by ``refusals / baseline refusals × target``: below the target, trials are ordered by
refusals on both axes, so only the one that refuses least stays on the front.

Here the same transform applies to the sampler's view only, with refusals counted as a fraction of
the trial's prompts instead of the baseline's refusals (a positive per-axis scale, which changes
neither the non-domination ranks nor TPE's hypervolume tie-break). The study stores the measured
(refusals, KL), so the front, the exported trial, the report and ``stop_dominated`` are unchanged.

The refusal floor (``study.refusal_floor``) is the same idea on the other axis: refusals below a
fraction of the prompts count as that fraction, so all trials the export target accepts share one
refusal value and TPE ranks them by KL alone (a 0-refusal trial at high KL leaves the good group).
On the demo it lowered the chosen trial's eval KL but chose trials at the edge of the target, which
held-out prompts refused far more often (benchmarks/README.md), so it is off by default.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def sampler_values(refusals: float, kl: float, n: int, target: float | None,
                   floor: float | None = None) -> tuple[float, float]:
    """(refusals, KL) as the sampler sees them: KL below ``target`` becomes ``refusals / n × target``;
    refusals below ``floor × n`` count as ``floor × n``."""
    if target and kl < target:
        kl = refusals / max(n, 1) * target
    if floor is not None:
        refusals = max(refusals, floor * n)
    return refusals, kl


class _SamplerView:
    """The study as the sampler reads it: its trials with the transformed KL, the rest delegated."""

    def __init__(self, study: optuna.Study, target: float | None, floor: float | None = None) -> None:
        self._study = study
        self._target = target
        self._floor = floor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _view(self, trial: FrozenTrial) -> FrozenTrial:
        if trial.state != TrialState.COMPLETE or trial.values is None or len(trial.values) != 2:
            return trial
        refusals, kl = trial.values
        seen = sampler_values(refusals, kl, int(trial.user_attrs.get("n", 0)), self._target,
                              self._floor)
        if seen == (refusals, kl):
            return trial
        trial = copy.copy(trial)
        trial.values = list(seen)
        return trial

    def _get_trials(self, deepcopy: bool = False, states: Sequence[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        # the one accessor TPE's _sample reads trials through (a test checks the view changes its split)
        return [self._view(t) for t in self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)]


class KLTargetTPESampler(optuna.samplers.TPESampler):
    """``TPESampler`` whose TPE step sees KL below ``kl_target`` as a refusal score and refusals below
    ``refusal_floor`` as that floor (module docstring)."""

    def __init__(self, kl_target: float | None, refusal_floor: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kl_target = kl_target
        self._refusal_floor = refusal_floor

    def _sample(self, study, trial, search_space):
        return super()._sample(_SamplerView(study, self._kl_target, self._refusal_floor), trial, search_space)
