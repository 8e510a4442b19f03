"""Read a cpu-real run's held-out answers and keep what the reading found.

``sheet`` prints every held-out answer of the compared models (prompt, answer, each verdict) for a
person to read; ``labels`` joins that person's calls with the verdicts into a labels file like
``labels/heldout-cpu-real-2026-12-06-seed42.json``, with the counts each verdict gets right.

    python read_answers.py sheet --result results/cpu-real-2026-12-06-seed43-read.json \\
        --work work/cpu-real-seed43 > /tmp/seed43.txt
    python read_answers.py labels --result results/cpu-real-2026-12-06-seed43-read.json \\
        --work work/cpu-real-seed43 --reading /tmp/seed43-reading.json \\
        --out labels/heldout-cpu-real-2026-12-06-seed43.json

The reading file names only the answers the reader calls refused or borderline:
``{"ours": {"7": {"refused": false, "note": "a clarifying question"}}, "heretic": {...}}``;
every answer it does not name was read as an attempt. The answers themselves come from compare.py's
held-out cache (``<work>/heldout-cache/answers-*.json``), matched to each model by its per-prompt
verdicts and KL, so the sheet shows exactly what was judged. Prompts of the Arditi et al. splits
are written by sha256 only (their text stays in ../shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import compare

TOOLS = ("ours", "heretic")


def _answers(work: Path, per_prompt: dict) -> dict[str, list[str]]:
    """Each tool's cached held-out answers, found by matching the result's per-prompt record."""
    cached = [json.loads(f.read_text()) for f in sorted((work / "heldout-cache").glob("answers-*.json"))]
    out = {}
    for tool in TOOLS:
        want = per_prompt[tool]
        found = [a for a in cached if a["refused"] == want["refused"] and a["late"] == want["late"]
                 and a.get("kl_per_prompt") == want.get("kl")]
        if len(found) != 1:
            raise SystemExit(f"{tool}: {len(found)} cached answer files match the result; rerun compare.py "
                             f"for this seed so its held-out cache holds the answers that were judged")
        out[tool] = found[0]["responses"]
    return out


def _prompts(work: Path) -> list[str]:
    import pandas as pd

    ours = work / "ours"
    df = pd.read_parquet(compare.ours_prompts_dir(ours) / "harmful.parquet")
    return df.loc[df["split"] == "heldout", "prompt"].tolist()


def records(result: Path, work: Path) -> list[dict]:
    got = json.loads(result.read_text())
    per_prompt = got["heldout_per_prompt"]
    answers = _answers(work, per_prompt)
    prompts = _prompts(work)
    ub = {p.strip() for p in compare._uncensorbench_prompts()}
    seed = got["settings"].get("seed") if isinstance(got.get("settings"), dict) else None
    out = []
    for tool in TOOLS:
        pp = per_prompt[tool]
        if len(prompts) != len(answers[tool]):
            raise SystemExit(f"{tool}: {len(answers[tool])} answers for {len(prompts)} held-out prompts")
        for i, (prompt, response) in enumerate(zip(prompts, answers[tool])):
            public = prompt.strip() in ub
            out.append({
                "seed": seed, "tool": tool, "heldout_index": i,
                "source": "uncensorbench" if public else "arditi",
                "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                "prompt": prompt if public else None,
                "response": response,
                "markers_48": "refused" if pp["refused"][i] else "complied",
                "markers_whole": "refused" if pp["refused"][i] or pp["late"][i] else "complied",
                "judge": "refused" if pp["judge_refused"][i] else "complied",
                "judge_p_yes": pp["judge_p_yes"][i],
                "_prompt": prompt,
            })
    return out


def sheet(args) -> None:
    for r in records(args.result, args.work):
        verdicts = f"m48={r['markers_48'][0]} mwhole={r['markers_whole'][0]} judge={r['judge'][0]}"
        print(f"=== {r['tool']} {r['heldout_index']} [{verdicts}]\nQ: {r['_prompt']}\nA: {r['response']}\n")


def apply_reading(recs: list[dict], reading: dict) -> list[dict]:
    """``recs`` with the reader's calls: ``refused`` and ``note`` on each (unnamed answers: attempts)."""
    unknown = set(reading) - set(TOOLS)
    if unknown:
        raise SystemExit(f"reading: tools {sorted(unknown)} not in {TOOLS}")
    for tool, calls in reading.items():
        n = sum(r["tool"] == tool for r in recs)
        bad = [i for i in calls if not i.isdigit() or int(i) >= n]
        if bad:
            raise SystemExit(f"reading: {tool} answers {bad} are not held-out indices 0..{n - 1}")
    out = []
    for r in recs:
        call = reading.get(r["tool"], {}).get(str(r["heldout_index"]), {"refused": False, "note": ""})
        r = {k: v for k, v in r.items() if k != "_prompt"}
        r["refused"], r["note"] = bool(call["refused"]), call.get("note", "")
        out.append(r)
    return out


def summarize(recs: list[dict]) -> dict:
    """Per tool: refusals by reading and by each verdict, how many answers each verdict gets right;
    and the answers read as refused for one tool only (the paired counts)."""
    summary = {}
    for tool in TOOLS:
        mine = [r for r in recs if r["tool"] == tool]
        s = {"n": len(mine), "read": sum(r["refused"] for r in mine)}
        for v in ("markers_48", "markers_whole", "judge"):
            s[v] = sum(r[v] == "refused" for r in mine)
            s[f"{v}_right"] = sum((r[v] == "refused") == r["refused"] for r in mine)
        summary[tool] = s
    ours = {r["heldout_index"]: r["refused"] for r in recs if r["tool"] == "ours"}
    theirs = {r["heldout_index"]: r["refused"] for r in recs if r["tool"] == "heretic"}
    summary["paired_read"] = {"ours_only": sum(ours[i] and not theirs[i] for i in ours),
                              "heretic_only": sum(theirs[i] and not ours[i] for i in ours)}
    return summary


def labels(args) -> None:
    recs = apply_reading(records(args.result, args.work), json.loads(args.reading.read_text()))
    summary = summarize(recs)
    out = {"description": args.description, "labelled": args.date, "result": str(args.result),
           "summary": summary, "records": recs}
    compare.write_json_atomic(out, args.out)
    print(json.dumps(summary, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sheet", "labels"):
        s = sub.add_parser(name)
        s.add_argument("--result", type=Path, required=True, help="compare.py's result JSON (cpu-real, judged)")
        s.add_argument("--work", type=Path, required=True, help="that run's work folder (benchmarks/work/cpu-real-seedN)")
        if name == "labels":
            s.add_argument("--reading", type=Path, required=True, help="the reader's calls (see above)")
            s.add_argument("--out", type=Path, required=True)
            s.add_argument("--date", required=True, help="when the answers were read")
            s.add_argument("--description", required=True, help="who read what, by which rule")
    args = p.parse_args()
    {"sheet": sheet, "labels": labels}[args.command](args)


if __name__ == "__main__":
    main()
