"""The GGUF users take home, judged like the merged model it came from: held-out refusals and KL.

    python benchmarks/gguf_heldout.py --work benchmarks/work/cpu-real-seed42 --types q8_0 f16 --out F

takes our run of a cpu-real benchmark (compare.py's work folder: the merged model, its adapter and the
held-out split), writes ``merge.gguf`` for each type from the source GGUF (only the edited tensors
replaced), loads each file back with transformers (``gguf_file=``, dequantised to float32) and measures
it and the merged safetensors model on the same held-out prompts the way compare.py does (refusal
markers within 48 tokens on the harmful prompts, first-token KL to the base model on the harmless
ones), prompt by prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))


def main(argv=None) -> int:
    import compare

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="compare.py's work folder of a cpu-real seed")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--types", nargs="+", default=["q8_0"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch
    from abliterate import gguf_export, loading, session

    protocol = replace(compare.PROTOCOLS["cpu-real"], seed=args.seed)
    torch.set_num_threads(protocol.threads)
    import real_models

    source_gguf = real_models.installed(real_models.get_model(protocol.real_model))
    run_dir = args.work / "ours" / "results" / "bench-cpu-real"
    splits = compare.workflow_splits(args.work / "ours", "bench-cpu-real")
    config = compare.eval_config(protocol)
    out = {"source": source_gguf.name, "source_bytes": source_gguf.stat().st_size, "seed": args.seed, "models": {}}

    def measure(label: str, lm, base_lp=None):
        got, lp = compare.measure_heldout(lm, *compare.heldout_prompts(config, lm, protocol, splits), base_lp)
        out["models"][label] = {"refusals": got["refusals"], "n": got["n"], "kl": got.get("kl"),
                                "refused": got["refused"], "kl_per_prompt": got.get("kl_per_prompt")}
        return lp

    base_lp = measure("base", session.open_model(config, path=protocol.model))
    measure("merged", session.open_model(config, path=str(run_dir / "model")), base_lp)
    for kind in args.types:
        path = args.work / "gguf" / f"{kind}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        facts = gguf_export.export(run_dir / "model", run_dir / "adapter", path, kind, source_gguf=source_gguf)
        seconds = time.perf_counter() - start
        lm = loading.load_model(loading.ModelSource(path=str(path.parent), gguf_file=path.name),
                                torch.device("cpu"), cascade=("float32",))
        measure(f"gguf-{kind}", lm, base_lp)
        out["models"][f"gguf-{kind}"] |= {"bytes": facts["bytes"], "replaced": len(facts["replaced"]),
                                          "export_s": round(seconds, 1)}
    merged = out["models"]["merged"]
    for label, got in out["models"].items():
        if label.startswith("gguf-"):
            got["same_verdicts_as_merged"] = sum(a == b for a, b in zip(got["refused"], merged["refused"]))
            got["max_kl_difference"] = max(abs(a - b) for a, b in zip(got["kl_per_prompt"], merged["kl_per_prompt"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    compare.write_json_atomic(out, args.out)
    print(json.dumps({k: {kk: v for kk, v in m.items() if kk not in ("refused", "kl_per_prompt")}
                      for k, m in out["models"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
