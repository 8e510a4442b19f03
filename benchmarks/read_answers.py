"""Read a cpu-real run's held-out answers and keep what the reading found.

``sheet`` prints every held-out answer of the compared models (prompt, answer, each verdict) for a
person to read; ``labels`` joins that person's calls with the verdicts into a labels file like
``labels/heldout-cpu-real-2026-12-06-seed42.json``, with the counts each verdict gets right.

    python read_answers.py sheet --result results/cpu-real-2026-12-06-seed43-read.json \\
        --work work/cpu-real-seed43 > /tmp/seed43.txt
    python read_answers.py labels --result results/cpu-real-2026-12-06-seed43-read.json \\
        --work work/cpu-real-seed43 --reading /tmp/seed43-reading.json \\
        --out labels/heldout-cpu-real-2026-12-06-seed43.json

A second reader can read the same answers blind (``sheet --blind-key KEY``: shuffled, without tools
or verdicts); ``agree`` then sets that reading against the labels (agreement, Cohen's kappa, and the
answers called differently); ``pool`` adds runs up (each reading, both, either, with the paired test).

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
import random
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

    df = pd.read_parquet(compare.ours_prompts_dir(work / "ours") / "harmful.parquet")
    return df.loc[df["split"] == "heldout", "prompt"].tolist()


def records(result: Path, work: Path) -> list[dict]:
    """One record per held-out answer and tool: the answer, each verdict, the prompt's source and
    sha256 (``_prompt``, its text, is for the sheet and never written)."""
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
    recs = records(args.result, args.work)
    if args.blind_key is None:
        for r in recs:
            verdicts = f"m48={r['markers_48'][0]} mwhole={r['markers_whole'][0]} judge={r['judge'][0]}"
            print(f"=== {r['tool']} {r['heldout_index']} [{verdicts}]\nQ: {r['_prompt']}\nA: {r['response']}\n")
        return
    # a second reader sees neither the tool nor any verdict, in an order that mixes the tools
    order = list(range(len(recs)))
    random.Random(args.shuffle_seed).shuffle(order)
    key = {f"a{k:03d}": {"tool": recs[i]["tool"], "heldout_index": recs[i]["heldout_index"]}
           for k, i in enumerate(order)}
    compare.write_json_atomic(key, args.blind_key)
    for name, i in zip(key, order):
        print(f"=== {name}\nQ: {recs[i]['_prompt']}\nA: {recs[i]['response']}\n")


def _refused(calls: list[dict]) -> dict[tuple[str, int], bool]:
    """A reading's calls (labels records or a second reading's calls) by (tool, held-out index)."""
    return {(c["tool"], c["heldout_index"]): c["refused"] for c in calls}


def agreement(labels: dict, blind: dict, key: dict) -> dict:
    """How a second, blind reading (``{answer id: {"refused": bool}}`` over ``key``'s ids) agrees with
    the labels: counts per tool, raw agreement and Cohen's kappa, and the answers called differently."""
    if set(blind) != set(key):
        raise SystemExit(f"blind reading: {len(set(key) - set(blind))} answers not called, "
                         f"{len(set(blind) - set(key))} unknown ids")
    first = _refused(labels["records"])
    pairs = [(first[(k["tool"], k["heldout_index"])], bool(blind[i]["refused"]), k, i) for i, k in key.items()]
    n = len(pairs)
    agree = sum(a == b for a, b, _, _ in pairs) / n
    pa, pb = sum(a for a, *_ in pairs) / n, sum(b for _, b, *_ in pairs) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    by_tool = {t: {"first": sum(a for a, _, k, _ in pairs if k["tool"] == t),
                   "second": sum(b for _, b, k, _ in pairs if k["tool"] == t),
                   "both": sum(a and b for a, b, k, _ in pairs if k["tool"] == t),
                   "either": sum(a or b for a, b, k, _ in pairs if k["tool"] == t)} for t in TOOLS}
    return {"n": n, "agreement": round(agree, 4),
            "kappa": round((agree - chance) / (1 - chance), 4) if chance < 1 else None,
            "refused_by_tool": by_tool,
            "differ": [{**k, "first": a, "second": b, "second_note": blind[i].get("note", "")}
                       for a, b, k, i in pairs if a != b]}


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
    paired = pooled_reading([{"records": recs}], [])["first"]
    summary["paired_read"] = {k: paired[k] for k in ("ours_only", "heretic_only")}
    return summary


def agree(args) -> None:
    blind, key = json.loads(args.blind.read_text()), json.loads(args.key.read_text())
    got = agreement(json.loads(args.labels.read_text()), blind, key)
    calls = sorted(({**key[i], "refused": bool(c["refused"]), "note": c.get("note", "")} for i, c in blind.items()),
                   key=lambda c: (TOOLS.index(c["tool"]), c["heldout_index"]))
    got = {"labels": str(args.labels), "reader": args.reader, **got, "calls": calls}
    compare.write_json_atomic(got, args.out)
    print(json.dumps({k: v for k, v in got.items() if k not in ("differ", "calls")}, indent=1))


def pooled_reading(labels: list[dict], seconds: list[dict]) -> dict:
    """Refusals by reading, per tool, pooled over runs (one labels file and, optionally, its second
    reading each): the first reader, the second, both and either; each with the answers refused for one
    tool only and the exact McNemar p of that split."""
    import paired

    if seconds and len(seconds) != len(labels):
        raise SystemExit(f"{len(labels)} labels files but {len(seconds)} second readings: give one per labels file")
    calls = {"first": [], "second": [], "both": [], "either": []}
    for i, lab in enumerate(labels):
        first = _refused(lab["records"])
        second = _refused(seconds[i]["calls"]) if seconds else None
        n = sum(t == "ours" for t, _ in first)
        for idx in range(n):
            a = {t: first[(t, idx)] for t in TOOLS}
            calls["first"].append(a)
            if second is not None:
                b = {t: second[(t, idx)] for t in TOOLS}
                calls["second"].append(b)
                calls["both"].append({t: a[t] and b[t] for t in TOOLS})
                calls["either"].append({t: a[t] or b[t] for t in TOOLS})
    out = {}
    for reading, pairs in calls.items():
        if not pairs:
            continue
        ours_only = sum(p["ours"] and not p["heretic"] for p in pairs)
        heretic_only = sum(p["heretic"] and not p["ours"] for p in pairs)
        out[reading] = {"n": len(pairs), **{t: sum(p[t] for p in pairs) for t in TOOLS},
                        "ours_only": ours_only, "heretic_only": heretic_only,
                        "p": round(paired.mcnemar_exact(ours_only, heretic_only), 4)}
    return out


def pool(args) -> None:
    got = pooled_reading([json.loads(p.read_text()) for p in args.labels],
                         [json.loads(p.read_text()) for p in args.second])
    print(json.dumps(got, indent=1))


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
    q = sub.add_parser("pool", help="refusals by reading pooled over runs, with the paired test")
    q.add_argument("--labels", type=Path, nargs="+", required=True)
    q.add_argument("--second", type=Path, nargs="*", default=[], help="each labels file's second reading, in order")
    a = sub.add_parser("agree", help="a second, blind reading against the labels")
    a.add_argument("--labels", type=Path, required=True, help="the labels file (read_answers.py labels)")
    a.add_argument("--blind", type=Path, required=True, help='{"a000": {"refused": true, "note": "…"}, …}')
    a.add_argument("--key", type=Path, required=True, help="the key sheet --blind-key wrote")
    a.add_argument("--reader", required=True, help="who read blind")
    a.add_argument("--out", type=Path, required=True)
    for name in ("sheet", "labels"):
        s = sub.add_parser(name)
        s.add_argument("--result", type=Path, required=True, help="compare.py's result JSON (cpu-real, judged)")
        s.add_argument("--work", type=Path, required=True, help="that run's work folder (benchmarks/work/cpu-real-seedN)")
        if name == "sheet":
            s.add_argument("--blind-key", type=Path, help="shuffle, hide tools and verdicts, write the key here")
            s.add_argument("--shuffle-seed", type=int, default=0)
        if name == "labels":
            s.add_argument("--reading", type=Path, required=True, help="the reader's calls (see above)")
            s.add_argument("--out", type=Path, required=True)
            s.add_argument("--date", required=True, help="when the answers were read")
            s.add_argument("--description", required=True, help="who read what, by which rule")
    args = p.parse_args()
    {"sheet": sheet, "labels": labels, "agree": agree, "pool": pool}[args.command](args)


if __name__ == "__main__":
    main()
