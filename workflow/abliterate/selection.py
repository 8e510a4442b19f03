"""Choosing one trial from a finished study, without prompting.

Input is the table of :func:`abliterate.study.trials_frame` (columns ``number``, ``state``,
``refusals``, ``kl`` and ``n``, the number of harmful prompts evaluated). Refusals are compared as
rates (``refusals / n``) where ``n`` is known, so trials evaluated on different prompt counts stay
comparable; ties are always broken by the lower trial number, which makes the choice deterministic.
Trials whose evaluation stopped once they were dominated (column ``dominated_by``) have only a
lower bound for their refusals: they are never chosen, never on the front, and not counted.

Policies (``policy["name"]``):

* ``min_kl_under_target`` (default): among trials whose refusal rate is at most
  ``refusal_target`` (a fraction of ``n``, default 0.1), the one with the lowest KL divergence.
  If none reaches the target, ``fallback`` decides: ``knee`` (default), the trial of the Pareto
  front farthest from the straight line between the front's two ends once both axes are scaled
  to [0, 1], i.e. the point where trading KL for fewer refusals stops paying off; or
  ``min_refusals``.
* ``min_refusals``: fewest refusals, then lowest KL.

Confirmation (optional, :func:`confirmation_candidates` and :func:`select_confirmed`): the eval
prompts are the ones the study optimised on, so the trial that scores lowest KL just under the
target on a few dozen of them is partly the luckiest there (on the demo benchmark, 5/50 eval
refusals became 13/50 held out). The front trials within the target are measured again on other
prompts the study never scored (the train split), and a trial is chosen only if it stays within
the target on eval and train counts together.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from abliterate import io
from abliterate.errors import AbliterateError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_POLICY: dict[str, Any] = {"name": "min_kl_under_target", "refusal_target": 0.1, "fallback": "knee"}
POLICIES = ("min_kl_under_target", "min_refusals")
FALLBACKS = ("knee", "min_refusals")
# A count exactly at the target (3 of 30 prompts at 0.1) is within it: 3 / 30 is 0.1 plus a rounding
# error in floating point, which this slack absorbs; it is far below any real step (1 / n).
RATE_SLACK = 1e-12


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    if "state" in df.columns:
        df = df[df["state"] == "COMPLETE"]
    return df.dropna(subset=["refusals", "kl"])


def _stopped(df: pd.DataFrame) -> pd.Series:
    if "dominated_by" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["dominated_by"].notna()


def _complete(df: pd.DataFrame) -> pd.DataFrame:
    """COMPLETE trials with both scores measured in full."""
    df = _finished(df)
    return df[~_stopped(df)].copy()


def _has_n(df: pd.DataFrame) -> bool:
    return "n" in df.columns and len(df) > 0 and bool(df["n"].notna().all())


def refusal_rate(df: pd.DataFrame) -> pd.Series:
    """``refusals / n`` per row; raises ``ConfigError`` when ``n`` is missing."""
    if not _has_n(df):
        raise ConfigError(
            "trials lack 'n' (the number of harmful prompts evaluated); the study objective "
            "must return it so refusal rates can be compared with refusal_target"
        )
    n = df["n"].astype(float)
    if (n <= 0).any():
        raise ConfigError("trials with n <= 0 evaluated prompts cannot give a refusal rate")
    return df["refusals"].astype(float) / n


def _refusal_axis(df: pd.DataFrame) -> pd.Series:
    return refusal_rate(df) if _has_n(df) else df["refusals"].astype(float)


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated COMPLETE trials on (refusal rate, KL), both minimised, sorted by refusals
    (then KL, then number). Trials with identical scores are all kept."""
    done = _complete(df)
    if done.empty:
        return done
    r = _refusal_axis(done).to_numpy()
    k = done["kl"].astype(float).to_numpy()
    # O(n^2) in memory is fine for the few hundred trials of a study.
    no_worse = (r[:, None] <= r[None, :]) & (k[:, None] <= k[None, :])
    better = (r[:, None] < r[None, :]) | (k[:, None] < k[None, :])
    dominated = (no_worse & better).any(axis=0)
    front = done[~dominated].assign(_r=r[~dominated])
    front = front.sort_values(["_r", "kl", "number"]).drop(columns="_r")
    return front.reset_index(drop=True)


def knee(front: pd.DataFrame) -> tuple[pd.Series, float]:
    """The front's point farthest from the line through its ends (both axes scaled to [0, 1]);
    returns ``(row, normalised distance)``. Ties, including fronts of one or two points, go to
    the lower trial number."""
    if front.empty:
        raise AbliterateError("the Pareto front is empty: no COMPLETE trials")
    x = _refusal_axis(front).to_numpy(dtype=float)
    y = front["kl"].to_numpy(dtype=float)

    def scale(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        return (v - v.min()) / span if span > 0 else np.zeros_like(v)

    x, y = scale(x), scale(y)
    order = np.lexsort((front["number"].to_numpy(), y, x))
    first, last = order[0], order[-1]
    dx, dy = x[last] - x[first], y[last] - y[first]
    length = math.hypot(dx, dy)
    if length == 0:
        dist = np.zeros_like(x)
    else:
        dist = np.abs(dx * (y - y[first]) - dy * (x - x[first])) / length
    best = dist.max()
    # Floating-point noise must not decide a tie.
    tied = front[np.isclose(dist, best, rtol=0, atol=1e-12)]
    row = tied.sort_values("number").iloc[0]
    return row, float(best)


def _fmt(row: pd.Series) -> str:
    n = row.get("n")
    refusals = str(int(row["refusals"])) + (f"/{int(n)}" if n is not None and not pd.isna(n) else "")
    return f"{refusals} refusals, KL {float(row['kl']):.4g}"


def _min_refusals(done: pd.DataFrame) -> pd.Series:
    ranked = done.assign(_r=_refusal_axis(done)).sort_values(["_r", "kl", "number"])
    return ranked.drop(columns="_r").iloc[0]


def _check_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(policy) - set(DEFAULT_POLICY)
    if unknown:
        raise ConfigError(f"selection policy: unknown keys {sorted(unknown)}; known {list(DEFAULT_POLICY)}")
    merged = {**DEFAULT_POLICY, **policy}
    if merged["name"] not in POLICIES:
        raise ConfigError(f"selection policy name {merged['name']!r}: choose one of {POLICIES}")
    if merged["fallback"] not in FALLBACKS:
        raise ConfigError(f"selection fallback {merged['fallback']!r}: choose one of {FALLBACKS}")
    target = merged["refusal_target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1:
        raise ConfigError(f"selection refusal_target {target!r}: a fraction of the evaluated prompts in "
                          "[0, 1]")
    return merged


def select_trial(df: pd.DataFrame, policy: Mapping[str, Any] | None = None) -> tuple[pd.Series, str]:
    """Pick one COMPLETE trial by ``policy`` (merged over ``DEFAULT_POLICY``); returns the row
    and a one-sentence reason for the log and the report."""
    policy = _check_policy(policy or {})
    done = _complete(df)
    if done.empty:
        raise AbliterateError("no COMPLETE trials to choose from; see the errors of the failed trials in the "
                              "study log, or raise n_trials")
    if policy["name"] == "min_refusals":
        row = _min_refusals(done)
        return row, f"trial {int(row['number'])}: fewest refusals, then lowest KL ({_fmt(row)})"

    target = float(policy["refusal_target"])
    rate = refusal_rate(done)
    ok = done[rate <= target + RATE_SLACK]
    if not ok.empty:
        row = ok.sort_values(["kl", "number"]).iloc[0]
        stopped = int(_stopped(_finished(df)).sum())
        others = f"; {stopped} more stopped once dominated" if stopped else ""
        return row, (
            f"trial {int(row['number'])}: lowest KL among the {len(ok)} of {len(done)} fully "
            f"evaluated trials with refusal rate <= {target:.0%}{others} ({_fmt(row)})"
        )
    best = _min_refusals(done)
    missed = f"no trial reached refusal rate <= {target:.0%} (best: {_fmt(best)})"
    if policy["fallback"] == "min_refusals":
        return best, f"trial {int(best['number'])}: {missed}; took the fewest refusals"
    front = pareto_front(done)
    row, dist = knee(front)
    return row, (
        f"trial {int(row['number'])}: {missed}; took the knee of the {len(front)}-trial Pareto "
        f"front (normalised distance {dist:.3f}; {_fmt(row)})"
    )


def named_trial(df: pd.DataFrame, number: int) -> tuple[pd.Series, str]:
    """The trial a user named (``export.trial``) instead of a policy's choice, if it can be exported:
    COMPLETE and measured in full (a trial stopped once dominated has only a lower bound)."""
    def refuse(why: str) -> ConfigError:
        front = ", ".join(str(int(n)) for n in pareto_front(df)["number"]) or "none"
        return ConfigError(f"export.trial: {why}; the Pareto front (pareto.csv, plots/pareto.png) holds trials {front}")

    rows = df[df["number"] == number]
    if rows.empty:
        raise refuse(f"the study has no trial {number} (trials {int(df['number'].min())} to {int(df['number'].max())})")
    row = rows.iloc[0]
    if "state" in df.columns and row["state"] != "COMPLETE":
        raise refuse(f"trial {number} is {row['state']}, not COMPLETE")
    if bool(_stopped(rows).iloc[0]):
        raise refuse(f"trial {number} was stopped once trial {int(row['dominated_by'])} dominated it, so its "
                     f"{int(row['refusals'])} refusals are only a lower bound")
    return row, f"trial {number}: named by export.trial ({_fmt(row)})"


def confirmation_candidates(df: pd.DataFrame, policy: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The trials the policy accepts on the eval prompts (refusal rate within ``refusal_target``)
    that are on the Pareto front, lowest KL first; empty when the policy is ``min_refusals`` or no
    trial reaches the target (then the choice does not rest on the target's edge).

    Only these: confirmation can reject a trial that looked good on eval, never admit one that did
    not. Admitting trials over the target on eval when the train prompts were kind to them swapped
    one lucky count for another (on the default demo, 30 train prompts took a 3/24 trial under the
    target, and it refused 8/45 held-out prompts)."""
    policy = _check_policy(policy or {})
    done = _complete(df)
    if policy["name"] != "min_kl_under_target" or done.empty:
        return done.iloc[:0]
    target = float(policy["refusal_target"])
    front = pareto_front(done)
    near = front[refusal_rate(front) <= target + RATE_SLACK]
    return near.sort_values(["kl", "number"]).reset_index(drop=True)


def _pooled_kl(kl: float, kl_n: int, confirm_kl: float, confirm_kl_n: int) -> float:
    return (kl * kl_n + confirm_kl * confirm_kl_n) / (kl_n + confirm_kl_n)


def confirmation_cap(
    row: Mapping[str, Any], kl_n: int, confirm_kl: float, confirm_kl_n: int, confirm_n: int,
    best_pooled_kl: float | None, policy: Mapping[str, Any] | None = None,
) -> int:
    """The train refusals at which a candidate's confirmation can stop: one more than the pooled
    target leaves room for (it is then rejected whatever the rest says), and 0 when its pooled KL is
    already above that of a confirmed candidate (it cannot be chosen). Measuring KL first and
    generating in order of eval KL, most candidates after the first confirmed one cost one prefill."""
    target = float(_check_policy(policy or {})["refusal_target"])
    if best_pooled_kl is not None and _pooled_kl(float(row["kl"]), kl_n, confirm_kl, confirm_kl_n) > best_pooled_kl:
        return 0
    budget = math.floor(target * (int(row["n"]) + confirm_n) + 1e-9)
    return max(0, budget - int(row["refusals"]) + 1)


def select_confirmed(measured: pd.DataFrame,
                     policy: Mapping[str, Any] | None = None) -> tuple[pd.Series | None, str]:
    """The policy's choice on eval and confirmation counts pooled.

    ``measured``: candidates (within the target on eval; others are never chosen) with the eval columns ``refusals``, ``n``, ``kl`` and ``kl_n`` (harmless
    prompts behind ``kl``), the same four for the confirmation prompts prefixed ``confirm_``, and
    ``confirm_stopped`` (generation stopped at :func:`confirmation_cap`: the train refusals are a
    lower bound and the row is never chosen). Returns the row (with ``pooled_rate`` and
    ``pooled_kl``) of the lowest pooled KL among the fully measured ones whose pooled refusal rate is
    within the target, or ``None`` with the reason.
    """
    policy = _check_policy(policy or {})
    target = float(policy["refusal_target"])
    pooled = measured.assign(
        pooled_rate=(measured["refusals"] + measured["confirm_refusals"]) / (measured["n"] + measured["confirm_n"]),
        pooled_kl=_pooled_kl(measured["kl"], measured["kl_n"], measured["confirm_kl"], measured["confirm_kl_n"]),
    )
    stopped = pooled["confirm_stopped"].astype(bool)
    on_eval = measured["refusals"] / measured["n"] <= target + RATE_SLACK
    ok = pooled[~stopped & on_eval & (pooled["pooled_rate"] <= target + RATE_SLACK)]
    if ok.empty:
        pool = pooled if stopped.all() else pooled[~stopped]
        best = pool.sort_values(["pooled_rate", "pooled_kl", "number"]).iloc[0]
        bound = ">= " if bool(best["confirm_stopped"]) else ""
        return None, (
            f"none of the {len(pooled)} candidates refuses at most {target:.0%} of the eval and train "
            f"prompts together (best: trial {int(best['number'])}, {bound}{best['pooled_rate']:.1%})"
        )
    row = ok.sort_values(["pooled_kl", "number"]).iloc[0]
    return row, (
        f"trial {int(row['number'])}: lowest pooled KL among the {len(ok)} of {len(pooled)} front trials "
        f"within the target on eval whose eval and train prompts together are refused at most {target:.0%} "
        f"(eval {int(row['refusals'])}/{int(row['n'])}, train {int(row['confirm_refusals'])}/"
        f"{int(row['confirm_n'])}, KL {row['pooled_kl']:.4g})"
    )


def plot_pareto(df: pd.DataFrame, selected_number: int | None, path: str | os.PathLike):
    """Refusals vs KL of the COMPLETE trials, the Pareto front and the selected trial, as PNG (the
    matplotlib Figure is returned).

    Uses the Agg canvas directly (no pyplot state), so it is safe in worker processes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    done = _complete(df)
    stopped = _finished(df)
    stopped = stopped[_stopped(stopped)]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ns = done["n"].dropna().unique() if "n" in done.columns else []
    x_label = f"refusals (of {int(ns[0])} harmful prompts)" if len(ns) == 1 else "refusals"
    ax.set_xlabel(x_label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # refusals are counts
    ax.set_ylabel("KL divergence (harmless prompts)")
    if done.empty:
        ax.text(0.5, 0.5, "no complete trials", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.scatter(done["refusals"], done["kl"], s=18, color="0.6", label=f"trials ({len(done)})")
        if not stopped.empty:
            ax.scatter(stopped["refusals"], stopped["kl"], s=18, facecolors="none", edgecolors="0.6",
                       label=f"stopped once dominated ({len(stopped)}; refusals at least)")
        front = pareto_front(done)
        ax.plot(front["refusals"], front["kl"], "-o", color="tab:blue", ms=4, label="Pareto front")
        for _, point in front.iterrows():
            if point["number"] != selected_number:  # the trial numbers export.trial takes
                ax.annotate(str(int(point["number"])), (point["refusals"], point["kl"]), xytext=(3, 3),
                            textcoords="offset points", fontsize=7, color="tab:blue")
        counts = pd.concat([done["refusals"], stopped["refusals"]]).astype(float)
        if counts.max() - counts.min() < 2:
            # every trial at one count (a model that never refuses): integer ticks need room for three
            ax.set_xlim(counts.min() - 0.5, counts.min() + 2.5)
        kl = done["kl"].astype(float)
        if kl.min() > 0 and kl.max() / kl.min() > 100:
            ax.set_yscale("log")
        chosen = done[done["number"] == selected_number] if selected_number is not None else done[:0]
        if not chosen.empty:
            _mark_selected(ax, chosen.iloc[0])
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Study trials: refusals vs KL")
    with io.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120,
                    metadata={"Description": f"abliterate study; selected trial {selected_number}"})
    return fig


def _mark_selected(ax, row: pd.Series) -> None:
    ax.scatter([row["refusals"]], [row["kl"]], s=140, marker="*", color="tab:red", zorder=3,
               label=f"selected: trial {int(row['number'])}")
    # Point the label towards the middle of the axes so it is never clipped.
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    fx, fy = to_axes.transform((float(row["refusals"]), float(row["kl"])))
    ax.annotate(f"trial {int(row['number'])}\n{_fmt(row)}", (row["refusals"], row["kl"]),
                xytext=(16 if fx < 0.6 else -16, 16 if fy < 0.6 else -16), textcoords="offset points",
                ha="left" if fx < 0.6 else "right", va="bottom" if fy < 0.6 else "top", fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "tab:red"})
