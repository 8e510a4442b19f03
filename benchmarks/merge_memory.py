"""Peak RSS of the CPU merge against the model's size: the streaming merge and the whole-model merge.

    python benchmarks/merge_memory.py MODEL_FOLDER [--out benchmarks/results/merge-memory-<name>.json] [--whole]

MODEL_FOLDER is a safetensors model folder (a GGUF model: the folder the workflow's gguf_model rule
converts it into, e.g. ``loading.convert_gguf``). The adapter is synthetic but has the workflow's
shape: a PEFT LoRA adapter (r = alpha = 1) on every attention output and direct-edit factors on every
MLP down projection, so both merge paths run. Each merge runs in its own process, whose peak RSS
(``ru_maxrss``) is compared with the model's weights on disk; a process that only imports the
merge's libraries and loads the tokenizer gives the fixed overhead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "workflow"))


def make_adapter(model_dir: Path, out: Path) -> None:
    import torch
    from abliterate import ablation, io, loading
    from abliterate.streaming_merge import checkpoint_files

    _, entries = checkpoint_files(loading.resolve(loading.ModelSource(path=str(model_dir))))
    gen = torch.Generator().manual_seed(0)
    lora, direct, edits = {}, {}, []
    targets = []
    for name, entry in sorted(entries.items()):
        module = name.removesuffix(".weight")
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            continue
        out_f, in_f = entry.shape
        b, a = torch.randn(out_f, 1, generator=gen) * 1e-2, torch.randn(1, in_f, generator=gen) * 1e-2
        if name.endswith("o_proj.weight"):
            lora[f"base_model.model.{module}.lora_B.weight"] = b
            lora[f"base_model.model.{module}.lora_A.weight"] = a
            targets.append(module)
        elif name.endswith("down_proj.weight"):
            key = module.replace(".", "_")
            direct[f"{key}.lora_B"], direct[f"{key}.lora_A"] = b, a
            layer = int(module.split(".layers.")[1].split(".")[0])
            edits.append({"key": key, "name": module, "param": "weight", "layer": layer, "kind": "mlp_down",
                          "layout": "linear", "expert_axis_order": None})
    out.mkdir(parents=True, exist_ok=True)
    io.save_safetensors(lora, out / "adapter_model.safetensors")
    io.write_json({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": targets, "lora_dropout": 0.0,
                   "bias": "none", "fan_in_fan_out": False, "task_type": None, "base_model_name_or_path": None},
                  out / "adapter_config.json")
    io.save_safetensors(direct, out / ablation.DIRECT_EDITS_FILE, metadata={"direct_edits": edits})


def child(mode: str, model_dir: str, adapter: str, out: str) -> None:
    """One measured process: ``overhead`` (imports and the tokenizer only), ``stream`` or ``whole``."""
    import logging

    from abliterate import loading, merging

    logging.basicConfig(level=logging.INFO)
    source = loading.ModelSource(path=model_dir)
    start = time.perf_counter()
    info = {}
    if mode == "overhead":
        import transformers  # noqa: F401

        loading.load_tokenizer(source)
    else:
        info = merging.merge(source, adapter, out, max_ram_gib=64, metadata={}, card="", stream=mode == "stream")
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": round(time.perf_counter() - start, 1),
                      "estimated_ram_bytes": info.get("estimated_ram_bytes"), "streamed": info.get("streamed")}))


def measure(mode: str, model_dir: Path, adapter: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir), str(adapter), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:6])
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--whole", action="store_true", help="also measure the whole-model merge")
    args = ap.parse_args()
    size = sum(p.stat().st_size for p in args.model_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as tmp:
        tmp = Path(tmp)
        make_adapter(args.model_dir, tmp / "adapter")
        result = {"model_dir": str(args.model_dir), "model_bytes": size, "runs": {}}
        for mode in ["overhead", "stream"] + (["whole"] if args.whole else []):
            run = measure(mode, args.model_dir, tmp / "adapter", tmp / mode)
            run["peak_over_model"] = round(run["peak_rss_bytes"] / size, 3)
            result["runs"][mode] = run
            print(mode, json.dumps(run), flush=True)
        if args.whole:
            same = all((tmp / "stream" / p.name).read_bytes() == p.read_bytes()
                       for p in (tmp / "whole").glob("*.safetensors"))
            result["whole_and_stream_weights_identical"] = same
    over = result["runs"]["overhead"]["peak_rss_bytes"]
    result["stream_above_overhead_over_model"] = round((result["runs"]["stream"]["peak_rss_bytes"] - over) / size, 3)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
