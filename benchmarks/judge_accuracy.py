"""How often the LLM judge and the refusal markers agree with a human reading of the same answers.

    python benchmarks/judge_accuracy.py --judge PATH_OR_GGUF [--cpu-half] --out benchmarks/results/F.json

reads the hand-labelled answers of ``benchmarks/labels/judge-labels.json`` (Qwen2.5-Coder-0.5B-Instruct,
base and ablated, to uncensorbench's harmful and abliterate's harmless prompts, 128 tokens, each labelled
refused or not by reading it: ``benchmarks/README.md``, "The judge") and writes, for the judge and for
the markers (whole answer, and its first ``--marker-tokens`` tokens as the study sees it), accuracy,
the confusion counts and the unclear verdicts, plus the judge's seconds per answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
LABELS = BENCHMARKS / "labels" / "judge-labels.json"


def score(pred: list, truth: list[bool]) -> dict:
    """Accuracy over the clear predictions (None = unclear, counted apart) and the 2x2 counts."""
    clear = [(p, t) for p, t in zip(pred, truth) if p is not None]
    cells = {"tp": sum(p and t for p, t in clear), "fp": sum(p and not t for p, t in clear),
             "fn": sum(t and not p for p, t in clear), "tn": sum(not p and not t for p, t in clear)}
    right = cells["tp"] + cells["tn"]
    return {"n": len(truth), "clear": len(clear), "unclear": len(truth) - len(clear),
            "accuracy_clear": right / len(clear) if clear else None,
            # an unclear verdict counts as wrong here: what a user reading only clear verdicts misses
            "accuracy_all": right / len(truth), **cells}


def fit_threshold(z: list[float], truth: list[bool]) -> float:
    """The log-odds threshold (refused above it) with the most right verdicts on these answers: the
    midpoint between neighbouring values, the middle one among equally good."""
    values = sorted(set(z))
    cuts = [values[0] - 1.0] + [(a + b) / 2 for a, b in itertools.pairwise(values)] + [values[-1] + 1.0]
    right = [sum((v > c) == t for v, t in zip(z, truth)) for c in cuts]
    best = [c for c, r in zip(cuts, right) if r == max(right)]
    return best[len(best) // 2]


def auc(z: list[float], truth: list[bool]) -> float:
    """The chance that a refusal scores above an answer that is not one (ties count half)."""
    pos = [a for a, t in zip(z, truth) if t]
    neg = [b for b, t in zip(z, truth) if not t]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / max(1, len(pos) * len(neg))


def cross_validated(z: list[float], truth: list[bool], folds: int = 2) -> dict:
    """Accuracy of thresholds fitted on the other folds (folds stratified by label, in label-file
    order), so the figure is not the threshold's own training accuracy."""
    fold_of = [0] * len(z)
    for label in (True, False):
        for k, i in enumerate(i for i, t in enumerate(truth) if t == label):
            fold_of[i] = k % folds
    out, right = [], 0
    for f in range(folds):
        train = [i for i in range(len(z)) if fold_of[i] != f]
        test = [i for i in range(len(z)) if fold_of[i] == f]
        t = fit_threshold([z[i] for i in train], [truth[i] for i in train])
        hits = sum((z[i] > t) == truth[i] for i in test)
        right += hits
        out.append({"threshold": round(t, 3), "n_test": len(test), "right": hits})
    return {"folds": out, "accuracy": right / len(z)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", required=True, help="judge model: a folder, a hub id or a .gguf file")
    ap.add_argument("--cpu-half", action="store_true", help="judge in bfloat16 on the CPU")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--marker-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refusal-log-odds", type=float, default=0.0, help="evaluation.judge.refusal_log_odds")
    ap.add_argument("--min-log-odds", type=float, default=1.0, help="evaluation.judge.min_log_odds")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import compare
    import torch
    from abliterate import devices, judge, refusal
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    data = json.loads(LABELS.read_text(encoding="utf-8"))
    records = data["records"]
    truth = [r["refused"] for r in records]
    requests = [r["prompt"] for r in records]
    responses = [r["response"] for r in records]

    detector = refusal.RefusalDetector()
    answerer = AutoTokenizer.from_pretrained(BENCHMARKS.parent / data["answer_tokenizer"]) if data.get("answer_tokenizer") else None
    whole = [detector.is_refusal(t) for t in responses]
    short = None
    if answerer is not None:
        short = [detector.is_refusal(answerer.decode(answerer(t, add_special_tokens=False)["input_ids"]
                                                     [: args.marker_tokens])) for t in responses]

    settings = compare.judge_settings(args.judge, args.cpu_half, batch_size=args.batch_size,
                                      min_log_odds=args.min_log_odds, refusal_log_odds=args.refusal_log_odds)
    start = time.perf_counter()
    j = judge.Judge.load(settings, devices.get_device(), cache_root=BENCHMARKS / "work" / "judges")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    verdicts = j.judge(requests, responses)
    judge_s = time.perf_counter() - start
    pred = [None if v.verdict == judge.UNCLEAR else v.verdict == judge.REFUSED for v in verdicts]
    z = [v.log_odds for v in verdicts]
    fitted = fit_threshold(z, truth)
    calibration = {
        # the threshold that suits this judge (refusal_log_odds), fitted on all labels, and what
        # thresholds fitted on half the labels score on the other half
        "refusal_log_odds_fit": round(fitted, 3),
        "cross_validated": cross_validated(z, truth),
        "at_fit": score([v > fitted for v in z], truth),
        "auc": auc(z, truth),
    }

    groups = {}
    for key in sorted({(r["model"], r["kind"]) for r in records}):
        idx = [i for i, r in enumerate(records) if (r["model"], r["kind"]) == key]
        groups["/".join(key)] = {
            "refused_by_label": sum(truth[i] for i in idx),
            "judge": score([pred[i] for i in idx], [truth[i] for i in idx]),
            "markers_whole": score([whole[i] for i in idx], [truth[i] for i in idx]),
        }
    out = {
        "labels": str(LABELS.relative_to(BENCHMARKS.parent)), "judge": args.judge,
        "dtype": str(next(j.model.parameters()).dtype), "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "n": len(records), "refused_by_label": sum(truth),
        "judge_scores": score(pred, truth), "markers_whole": score(whole, truth),
        "markers_first_tokens": score(short, truth) if short else None, "marker_tokens": args.marker_tokens,
        "by_group": groups, "calibration": calibration,
        "settings": {"refusal_log_odds": args.refusal_log_odds, "min_log_odds": args.min_log_odds}, "load_s": round(load_s, 1), "judge_s_per_answer": round(judge_s / len(records), 3),
        "per_answer": [{"id": r["id"], "label": t, "judge": v.verdict, "p_yes": round(v.p_yes, 4),
                        "p_no": round(v.p_no, 4), "markers": w}
                       for r, t, v, w in zip(records, truth, verdicts, whole)],
    }
    compare.write_json_atomic(out, args.out)
    print(json.dumps({k: out[k] for k in ("judge", "dtype", "judge_scores", "markers_whole", "markers_first_tokens",
                                          "calibration", "judge_s_per_answer")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
