"""The GPU benchmark protocol's pieces that run anywhere: random-weight models of published shapes,
the protocol's workflow config, and memory sampling without a GPU."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("compare"), importlib.import_module("random_model")


def test_random_model_has_the_published_shape(bench, tiny_model_path):
    _, random_model = bench
    tokenizer = random_model.load_tokenizer(str(tiny_model_path))
    model = random_model.build("qwen3-0.6b", torch.bfloat16, "cpu", layers=1, tokenizer=tokenizer)
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (1024, 3072, 151936)
    assert config.num_hidden_layers == 1 and config.eos_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    assert random_model.SHAPES["qwen3-4b"]["hidden_size"] == 2560


def test_gpu_protocol_generates_every_token(bench):
    compare, _ = bench
    gpu = compare.our_config(compare.PROTOCOLS["gpu"], "M", "bench-gpu", None)
    assert gpu["study"]["stop_dominated"] is False
    assert gpu["model"]["dtypes"] == ["bfloat16"] and gpu["evaluation"]["max_new_tokens"] == 64
    demo = compare.our_config(compare.PROTOCOLS["cpu-demo"], "M", "bench", None)
    assert "stop_dominated" not in demo["study"]  # the shipped setting: the schema's default
    assert demo["model"]["quantization"] == "none"


def test_ours_trials_changes_our_study_only(bench):
    from dataclasses import replace

    compare, _ = bench
    protocol = replace(compare.PROTOCOLS["cpu-real"], ours_n_trials=40)
    config = compare.our_config(protocol, "M", "bench-cpu-real", None)
    assert config["study"]["n_trials"] == 40
    assert config["study"]["n_startup_trials"] == protocol.n_startup_trials
    assert protocol.n_trials == 20  # Heretic's study keeps the protocol's count


def test_quantized_protocol_is_a_valid_workflow_config(bench):
    from dataclasses import replace

    from snakemake.utils import validate

    compare, _ = bench
    protocol = replace(compare.PROTOCOLS["gpu"], quantization="bnb_4bit")
    config = compare.our_config(protocol, "M", "bench-gpu", None)
    assert config["model"]["quantization"] == "bnb_4bit"
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_tree_sampler_reports_rss_and_gpu_only_where_sampled(bench):
    compare, _ = bench
    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 * 2**20); time.sleep(0.6)"])
    with compare.TreeSampler(proc.pid, interval=0.05) as sampler:
        proc.wait()
    figures = sampler.figures()
    assert figures["peak_rss_tree_mb"] >= 50
    assert ("peak_gpu_mb" in figures) == (compare._gpu_memory_reader() is not None)


def test_shared_prompts_folder_follows_the_environment(tmp_path):
    code = "import compare; print(compare.SHARED_PROMPTS)"
    env = dict(os.environ, ABLITERATE_SHARED_PROMPTS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "benchmarks", env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(tmp_path)
