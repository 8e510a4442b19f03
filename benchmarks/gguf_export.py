"""Size and time of merge.gguf for a GGUF source: the source file against the patched copy.

    python benchmarks/gguf_export.py GGUF_FILE CONVERTED_FOLDER [--types q8_0 f16] [--out benchmarks/results/x.json]

CONVERTED_FOLDER is the float32 folder the gguf_model rule makes from GGUF_FILE. The adapter is
merge_memory.py's synthetic one (LoRA on every o_proj, direct edits on every down_proj); it is merged
with the streaming merge first, and only the export is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    from abliterate import gguf_export, loading, merging
    from merge_memory import make_adapter

    parser = argparse.ArgumentParser()
    parser.add_argument("gguf", type=Path)
    parser.add_argument("converted", type=Path)
    parser.add_argument("--types", nargs="+", default=["q8_0"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks" / "work") as tmp:
        tmp = Path(tmp)
        make_adapter(args.converted, tmp / "adapter")
        merging.merge(loading.ModelSource(path=str(args.converted)), str(tmp / "adapter"), str(tmp / "model"),
                      max_ram_gib=64, metadata={}, card="")
        for kind in args.types:
            start = time.perf_counter()
            facts = gguf_export.export(tmp / "model", tmp / "adapter", tmp / f"{kind}.gguf", kind, source_gguf=args.gguf)
            runs.append({"type": kind, "seconds": round(time.perf_counter() - start, 2), "bytes": facts["bytes"],
                         "replaced": len(facts["replaced"])})
    result = {"source": args.gguf.name, "source_bytes": args.gguf.stat().st_size, "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
