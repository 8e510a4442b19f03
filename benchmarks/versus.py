"""One tool's chosen models in some compare.py results against another's in others, on the same
held-out prompts, pooled over the pairs (e.g. our new defaults against our old ones, seed by seed).

    python benchmarks/versus.py --a ours benchmarks/results/cpu-real-2026-12-05-seed4{2,3,4}-k3off.json \
        --b ours benchmarks/results/cpu-real-2026-12-02-seed4{2,3,4}.json

Files pair up in the order given; each pair must have measured the same held-out prompts (checked on
the base model's per-prompt verdicts, which both files carry). Differences are A minus B: refusals
(markers within the held-out budget; McNemar's exact test) and first-token KL (bootstrap interval).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paired


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, metavar=("TOOL", "FILE"))
    ap.add_argument("--b", nargs="+", required=True, metavar=("TOOL", "FILE"))
    args = ap.parse_args(argv)
    (tool_a, *files_a), (tool_b, *files_b) = args.a, args.b
    if len(files_a) != len(files_b):
        ap.error("give as many files for --a as for --b")
    per_pair, rows = [], []
    for fa, fb in zip(files_a, files_b):
        ra, rb = (json.loads(Path(f).read_text()) for f in (fa, fb))
        base_a, base_b = ra["heldout_per_prompt"]["base"]["refused"], rb["heldout_per_prompt"]["base"]["refused"]
        if len(base_a) != len(base_b):
            raise SystemExit(f"{fa} and {fb} measured different held-out prompts")
        a, b = ra["heldout_per_prompt"][tool_a], rb["heldout_per_prompt"][tool_b]
        pair = paired.compare(a["refused"], b["refused"], a["kl"], b["kl"])
        per_pair.append({"ours": a, "heretic": b})
        rows.append({"a": fa, "b": fb, "base_same_verdicts": sum(x == y for x, y in zip(base_a, base_b)),
                     "a_refusals": sum(a["refused"]), "b_refusals": sum(b["refused"]), **pair})
    out = {"pairs": rows, "pooled": paired.pooled(per_pair),
           "across_pairs": paired.across_runs([{k: r[k] for k in ("kl_diff_mean", "refusals_diff")} for r in rows])}
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
