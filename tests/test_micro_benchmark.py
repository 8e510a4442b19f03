"""Smoke test of benchmarks/micro.py: every section runs on a tiny model and reports its keys (no timings checked)."""

from __future__ import annotations

import importlib.util

import torch
from abliterate.architecture import discover
from conftest import REPO


def _micro():
    spec = importlib.util.spec_from_file_location("micro", REPO / "benchmarks" / "micro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_micro_sections_report_their_keys(tiny_model_path, tmp_path):
    micro = _micro()
    cpu = torch.device("cpu")
    bandwidth = micro.measure_bandwidth(cpu, nbytes=4 * 2**20, reps=1)
    assert {"read_gbps", "copy_gbps", "bandwidth_bytes_per_s"} <= set(bandwidth)

    model, tokenizer = micro.load(str(tiny_model_path), cpu, torch.float32, tmp_path)
    n_components = len(discover(model).components)
    ablation = micro.bench_ablation(model, cpu, bandwidth, reps=1, row_norms=["none", "full"],
                                    routes=["lora", "direct"])
    assert [(r["path"], r["route"], r["row_norm"]) for r in ablation] == [
        (path, route, row_norm) for path in ("per_component", "batched") for route in ("lora", "direct")
        for row_norm in ("none", "full")]
    for row in ablation:
        assert {"edited_bytes", "bound_s", "apply_reset_s", "ratio", "target_met", "profile"} <= set(row)
        assert row["components"] == n_components  # a constant kernel edits every component
    # the LoRA layers were unloaded: the model is plain again
    assert not any("lora" in name for name, _ in model.named_modules())

    evals = micro.bench_eval(model, tokenizer, cpu, reps=1, batch_sizes=[2], max_new_tokens=3, with_lora=True)
    assert {(r["task"], r.get("early_stop")) for r in evals} == {
        ("generate", False), ("generate", True), ("first_token_logprobs", None)}
    assert all(r["model_state"] == "lora" and r["batch_s"] > 0 for r in evals)

    baseline = micro.run_child(1, False)
    merges = micro.bench_merge([str(tiny_model_path)], torch.float32, tmp_path, 1, baseline)
    assert {"merged_safetensors_bytes", "peak_rss_bytes", "ratio_peak_to_size",
            "ratio_peak_minus_baseline_to_size", "wall_s"} <= set(merges[0])
    assert merges[0]["peak_rss_bytes"] > 0

    result = {"context": {"device": "cpu", "threads": 1, "dtype": "float32", "loadavg_start": [0, 0, 0],
                          "loadavg_end": [0, 0, 0], "cpu_count": 2},
              "bandwidth": bandwidth, "ablation_model": "tiny", "ablation": ablation,
              "eval_model": "tiny", "eval": evals, "merge_baseline": baseline, "merge": merges}
    assert "ratio" in micro.table(result)


def test_the_static_cache_rival_decodes_the_tokens_we_decode(tiny_model_path):
    from abliterate import prompting
    from abliterate.generation import generate_ids
    from transformers import AutoModelForCausalLM, AutoTokenizer

    micro = _micro()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    texts = prompting.chat_texts(tokenizer, ["hello there", "how are you today", "write a poem"])
    assert micro.hf_static_generate(model, tokenizer, texts, 8) == generate_ids(model, tokenizer, texts, 8, 3)
