"""Both tools' Pareto fronts on held-out prompts, side by side, from ``heldout_front.py`` files.

``compare.py`` judges each tool by the one model its selection rule picks, so a comparison of two
chosen models mixes how good a front is with how lucky the pick was on 50 eval prompts. With each
front trial of both tools measured on the held-out prompts (``heldout_front.py``, ours with
``--work``, Heretic's with ``--heretic``), this prints per seed: the hypervolume of the eval front and
of the same trials held out; the chosen trial's held-out figures; and the lowest held-out KL among
each front's trials refusing at most ``--target`` of the held-out prompts (what a selection that knew
the held-out answers would have taken: the reach of the front where the export chooses).

    python benchmarks/compare_fronts.py --pair OURS.json HERETIC.json [--pair ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "workflow"))


def summary(front: dict, target: float) -> dict:
    """Hypervolumes, the chosen trial and the best trial within ``target`` on the front's split."""
    split = front["split"]
    number = front.get("chosen")  # recorded by heldout_front.py
    trials = front["trials"]
    within = [t for t in trials if t[split]["refusals"] <= target * t[split]["n"] + 1e-9]
    best = min(within, key=lambda t: (t[split]["kl"], t["number"])) if within else None

    def point(t):
        return None if t is None else {"number": t["number"], "eval": {k: t["eval"][k] for k in ("refusals", "n", "kl")},
                                       split: {k: t[split][k] for k in ("refusals", "n", "kl")}}

    return {
        "hypervolume": front["hypervolume"],
        "n_trials": len(trials),
        "chosen": point(next((t for t in trials if t["number"] == number), None)),
        "best_within_target": point(best),
    }


def fmt(p: dict | None, split: str) -> str:
    if p is None:
        return "—"
    h = p[split]
    return f"#{p['number']} {h['refusals']}/{h['n']} {h['kl']:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("OURS", "HERETIC"),
                    help="heldout_front.py files of one seed: our run's front, Heretic's")
    ap.add_argument("--target", type=float, default=0.1, help="held-out refusal rate for the best-within column")
    ap.add_argument("--out", type=Path, help="result JSON")
    args = ap.parse_args(argv)

    rows = []
    for ours_path, heretic_path in args.pair:
        fronts = {tool: json.loads(Path(p).read_text(encoding="utf-8"))
                  for tool, p in (("ours", ours_path), ("heretic", heretic_path))}
        splits = {f["split"] for f in fronts.values()}
        if len(splits) != 1:
            raise SystemExit(f"{ours_path} and {heretic_path} were measured on different splits: {splits}")
        if fronts["heretic"].get("tool") != "heretic":
            raise SystemExit(f"{heretic_path} is not Heretic's front (heldout_front.py --heretic)")
        source = json.loads(Path(fronts["heretic"]["source"]).read_text(encoding="utf-8"))
        rows.append({"seed": source["settings"]["seed"], "ours_file": ours_path, "heretic_file": heretic_path,
                     "split": splits.pop(),
                     **{tool: summary(f, args.target) for tool, f in fronts.items()}})

    within = f"best within {args.target:g}"
    print(f"{'':>4}  {'hypervolume, ours / Heretic':^29}  {'chosen trial':^37}  {within:^37}")
    print(f"{'seed':>4}  {'eval':^13}  {'held out':^13}  {'ours':^18} {'Heretic':^18}  {'ours':^18} {'Heretic':^18}")
    for r in rows:
        split = r["split"]
        o, h = r["ours"], r["heretic"]
        print(f"{r['seed']:>4}  {o['hypervolume']['eval']:.3f} / {h['hypervolume']['eval']:.3f}  "
              f"{o['hypervolume'][split]:.3f} / {h['hypervolume'][split]:.3f}  "
              f"{fmt(o['chosen'], split):^18} {fmt(h['chosen'], split):^18}  "
              f"{fmt(o['best_within_target'], split):^18} {fmt(h['best_within_target'], split):^18}")
    if args.out:
        import compare

        compare.write_json_atomic({"target": args.target, "pairs": rows}, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
