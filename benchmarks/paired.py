"""Paired comparison of two models on the same held-out prompts.

Each tool's chosen model answers the same harmful prompts and sees the same harmless ones, so the
per-prompt outcomes can be compared pair by pair, which separates a real difference from the
noise of 50 prompts far better than two unpaired rates: refusals with McNemar's exact test on the
prompts only one model refuses, KL with a percentile bootstrap of the mean per-prompt difference.
Standard library and numpy only (compare.py and summarize.py both use it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
# Per-prompt KL differences this small are float rounding between two runs of one model (float32
# first-token log-probabilities), not a difference between models.
KL_EQUAL = 1e-6
N_BOOTSTRAP = 10_000
# Student's t, two-sided 95 %, by degrees of freedom (numpy has no quantile function for it);
# past 30 the normal 1.96 is within 2 %.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def mcnemar_exact(ours_only: int, theirs_only: int) -> float:
    """Two-sided exact p-value of McNemar's test from the two discordant counts."""
    n = ours_only + theirs_only
    if n == 0:
        return 1.0
    k = min(ours_only, theirs_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def bootstrap_mean_ci(
    diffs: Sequence[float], n_boot: int = N_BOOTSTRAP, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (seeded: reruns agree)."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one difference")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def compare(
    ours_refused: Sequence[bool],
    theirs_refused: Sequence[bool],
    ours_kl: Sequence[float],
    theirs_kl: Sequence[float],
) -> dict:
    """Paired figures, ours against theirs; differences are ours minus theirs.

    ``*_refused``: one flag per harmful prompt, in the same prompt order for both tools;
    ``*_kl``: one KL(base ‖ model) per harmless prompt, likewise.
    """
    if len(ours_refused) != len(theirs_refused) or len(ours_kl) != len(theirs_kl):
        raise ValueError("paired comparison needs the same prompts for both tools")
    ours_only = sum(1 for a, b in zip(ours_refused, theirs_refused) if a and not b)
    theirs_only = sum(1 for a, b in zip(ours_refused, theirs_refused) if b and not a)
    diffs = [a - b for a, b in zip(ours_kl, theirs_kl)]
    lo, hi = bootstrap_mean_ci(diffs)
    out = {
        "n_harmful": len(ours_refused),
        "ours_only_refused": ours_only,
        "theirs_only_refused": theirs_only,
        "refusals_diff": ours_only - theirs_only,
        "refusals_p": mcnemar_exact(ours_only, theirs_only),
        "n_harmless": len(diffs),
        "kl_diff_mean": float(np.mean(diffs)),
        "kl_diff_ci95": [lo, hi],
    }
    out["verdict"] = verdict(out)
    return out


def verdict(paired: dict) -> str:
    """One line: which differences the prompts can tell apart at the 5 % level."""
    d, p = paired["refusals_diff"], paired["refusals_p"]
    if p < ALPHA:
        refusals = f"ours refuse {'fewer' if d < 0 else 'more'} ({d:+d}, p={p:.2g})"
    else:
        refusals = f"refusals not distinguishable ({d:+d}, p={p:.2g})"
    lo, hi = paired["kl_diff_ci95"]
    ci = f"{paired['kl_diff_mean']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]"
    if max(abs(lo), abs(hi)) <= KL_EQUAL:
        kl = f"KL equal within {KL_EQUAL:g} ({ci})"
    elif hi < 0:
        kl = f"ours lower KL ({ci})"
    elif lo > 0:
        kl = f"ours higher KL ({ci})"
    else:
        kl = f"KL not distinguishable ({ci})"
    return f"{refusals}; {kl}"


def pooled(per_file: Sequence[dict], refused: str = "refused") -> dict:
    """One paired comparison over several results' per-prompt outcomes (e.g. seeds).

    ``per_file``: dicts with ``ours`` and ``heretic``, each holding a ``refused`` list (the
    verdict to pool: ``refused`` for the markers, ``judge_refused`` for the judge) and ``kl``.
    Seeds draw their held-out prompts from pools that may overlap, so a prompt can count twice:
    the pooled interval is then somewhat too narrow.
    """
    cat = {
        tool: {key: [v for f in per_file for v in f[tool][key]] for key in (refused, "kl")}
        for tool in ("ours", "heretic")
    }
    out = compare(
        cat["ours"][refused], cat["heretic"][refused], cat["ours"]["kl"], cat["heretic"]["kl"]
    )
    return out | {"n_files": len(per_file)}


def across_runs(per_file: Sequence[dict]) -> dict:
    """The files' paired differences taken as one observation each (e.g. one per seed).

    :func:`pooled` treats every chosen model as fixed and only the prompts as a sample; but another
    seed gives another study and another chosen model, and that variation is usually the larger.
    Here each file's mean KL difference and refusal difference is one unit: their mean, a Student t
    95 % interval of it (needs two files or more), and a sign test on how many files favour each
    tool (ties dropped; the exact binomial test is McNemar's formula on the two counts).
    ``per_file``: the ``heldout_paired`` dicts compare.py writes.
    """
    if not per_file:
        raise ValueError("across_runs needs at least one file")
    out: dict = {"n_files": len(per_file)}
    for key, name in (("kl_diff_mean", "kl"), ("refusals_diff", "refusals")):
        d = np.asarray([f[key] for f in per_file], dtype=float)
        mean = float(d.mean())
        out[f"{name}_mean"] = mean
        if d.size > 1:
            df = d.size - 1
            t = T975[df - 1] if df <= len(T975) else 1.96
            half = t * float(d.std(ddof=1)) / math.sqrt(d.size)
            out[f"{name}_ci95"] = [mean - half, mean + half]
        higher, lower = int((d > 0).sum()), int((d < 0).sum())
        out[f"{name}_files_higher"], out[f"{name}_files_lower"] = higher, lower
        out[f"{name}_sign_p"] = mcnemar_exact(higher, lower)
    return out


def across_runs_line(summary: dict) -> str:
    """One line for :func:`across_runs`: mean, interval and sign test of each difference."""
    parts = []
    for name, fmt in (("kl", "{:+.4f}"), ("refusals", "{:+.2f}")):
        ci = summary.get(f"{name}_ci95")
        interval = f", 95% t-interval [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else ""
        parts.append(
            f"{name} {fmt.format(summary[f'{name}_mean'])}{interval}, ours higher in "
            f"{summary[f'{name}_files_higher']} and lower in {summary[f'{name}_files_lower']} "
            f"(sign test p={summary[f'{name}_sign_p']:.2g})"
        )
    return f"across {summary['n_files']} files, one unit each (ours - heretic): " + "; ".join(parts)
