"""Summarise several compare.py results (e.g. one protocol at several seeds) in one table.

    python benchmarks/summarize.py benchmarks/results/cpu-demo-2026-11-26*-seed*.json

One row per result file and tool, then the mean and standard deviation over files per tool,
and the mean of the per-file ratios ours/Heretic. A single seed decides little about the
quality figures: a different seed changes the prompt splits and both samplers, and one refusal
is 2 points of 50. Files that carry per-prompt held-out outcomes (compare.py since 2026-11-26)
add their paired comparison, one pooled over all of them, and one that takes each file (each
seed's chosen models) as a single observation: the pooled interval only counts the prompts as
random, while another seed also gives another study and chosen model (paired.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TOOLS = ("ours", "heretic")
# (key in a tool's figures, column title, format)
COLUMNS = (
    ("trials_per_hour", "trials/h", "{:.0f}"),
    ("s_per_trial_median", "s/trial", "{:.1f}"),
    ("hypervolume", "hypervolume", "{:.3f}"),
    ("heldout_refusal_rate", "held-out refused", "{:.2f}"),
    ("heldout_kl", "held-out KL", "{:.3f}"),
)


def load(paths: list[Path]) -> list[dict]:
    results = []
    for path in paths:
        result = json.loads(path.read_text())
        result["_file"] = path.name
        results.append(result)
    return results


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _mean_sd(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(results: list[dict]) -> str:
    head = ["file", "seed", "tool"] + [title for _, title, _ in COLUMNS]
    rows = []
    for result in results:
        for tool in TOOLS:
            figures = result.get(tool)
            if figures:
                rows.append(
                    [result["_file"], str(result["settings"]["seed"]), tool]
                    + [_cell(figures.get(key), fmt) for key, _, fmt in COLUMNS]
                )
    for tool in TOOLS:
        rows.append(
            [f"mean ± sd ({len(results)} files)", "", tool]
            + [
                _mean_sd(
                    [r[tool][key] for r in results if r.get(tool) and r[tool].get(key) is not None],
                    fmt,
                )
                for key, _, fmt in COLUMNS
            ]
        )
    ratios = []
    for key, _, _ in COLUMNS:
        per_file = [
            r["ratio_ours_over_heretic"][key]
            for r in results
            if (r.get("ratio_ours_over_heretic") or {}).get(key) is not None
        ]
        ratios.append(_mean_sd(per_file, "{:.2f}"))
    rows.append(["mean of ratios ours/Heretic", "", ""] + ratios)
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def paired_lines(results: list[dict]) -> list[str]:
    """The paired held-out verdict of each file that has one, then pooled over those files."""
    import paired

    with_prompts = [r for r in results if r.get("heldout_paired") and r.get("heldout_per_prompt")]
    lines = []
    for r in with_prompts:
        lines.append(f"{r['_file']}: {r['heldout_paired']['verdict']}")
        if "judge" in r["heldout_paired"]:
            lines.append(f"{r['_file']}, judge: {r['heldout_paired']['judge']['verdict']}")
    if len(with_prompts) > 1:
        pool = paired.pooled([r["heldout_per_prompt"] for r in with_prompts])
        lines.append(
            f"pooled over {pool['n_files']} files ({pool['n_harmful']} harmful, "
            f"{pool['n_harmless']} harmless prompts): {pool['verdict']}"
        )
        lines.append(paired.across_runs_line(paired.across_runs([r["heldout_paired"] for r in with_prompts])))
        if all("judge_refused" in r["heldout_per_prompt"][tool] for r in with_prompts for tool in ("ours", "heretic")):
            pool = paired.pooled([r["heldout_per_prompt"] for r in with_prompts], refused="judge_refused")
            lines.append(f"pooled, the judge's verdicts instead of the markers: {pool['verdict']}")
    if lines:
        lines.insert(0, "held-out, paired on the same prompts (ours - heretic):")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="compare.py result JSON files")
    args = ap.parse_args(argv)
    results = load(args.results)
    print(table(results))
    lines = paired_lines(results)
    if lines:
        print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
