"""The whole workflow on a real safety-tuned model: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M), which
benchmarks/real_models.py installs offline from PyPI. Skipped when that file is not installed.
What it measured, and how long it takes: benchmarks/README.md ("The real-model test").
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import workflow_runner as wr
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b"
INSTALL = f"python benchmarks/real_models.py install {MODEL}"

# The merged model's held-out first-token KL (harmless prompts, against the base model) must stay
# below this. Measured: the five trials of this study scored eval KLs of 0.021 to 0.144 and the chosen
# one 0.047 held out; 0.2 admits whichever of them another CPU's rounding makes the study choose.
# It is still a small shift: the demo's chosen edits sit at 0.085 to 0.09 (README), and the
# benchmarks take a KL of 1 nat as "far past useful models" (benchmarks/compare.py, REF_POINT).
MAX_HELDOUT_KL = 0.2


def _real_models():
    spec = importlib.util.spec_from_file_location(
        "real_models", REPO / "benchmarks" / "real_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rm = _real_models()
# the size only (instant); the install script checks the sha256
GGUF = rm.installed(rm.MODELS[MODEL], check_hash=False)


@pytest.mark.skipif(GGUF is None, reason=f"the {MODEL} GGUF is not installed: run {INSTALL}")
def test_abliterating_a_real_model_removes_refusals_at_small_kl(tmp_path):
    cfg = yaml.safe_load((REPO / "configs" / f"{MODEL}.yaml").read_text())
    cfg["run"] = "qwen05"
    cfg["seed"] = 0
    cfg["model"]["path"] = str(GGUF.parent)  # the config's path is relative to the repository root
    # 15 topics of 10 harmful prompts: 3/1.5/3 per topic; harmless about 33/17/17
    cfg["prompts"]["harmful"]["splits"] = {"train": 0.2, "eval": 0.1, "heldout": 0.2, "demo": 0.0}
    cfg["prompts"]["harmless"]["splits"] = {
        "train": 0.06,
        "eval": 0.03,
        "heldout": 0.03,
        "demo": 0.0,
    }
    # Qwen's refusals start "I'm sorry" or "As an AI": 16 tokens show them
    # held-out answers to 48 tokens (not the default 128): a refusal after a sentence of disclaimer
    # still shows, in a test that must fit CI's CPU budget
    cfg["evaluation"] = {"max_new_tokens": 16, "heldout_max_new_tokens": 48}
    cfg["study"] = {"n_trials": 5, "n_startup_trials": 3}
    wr.write_config(tmp_path, cfg)

    start = time.monotonic()
    wr.run(tmp_path, timeout=1200)
    seconds = time.monotonic() - start

    summary = json.loads((tmp_path / "results" / "qwen05" / "summary.json").read_text())
    base, merged = summary["baseline"]["heldout"], summary["merged"]["heldout"]
    print(
        f"\n{MODEL}: held-out refusals {base['refusals']}/{base['n']} -> {merged['refusals']}/{merged['n']}, "
        f"KL {merged['kl']:.4f}; eval {summary['baseline']['eval']['refusals']} -> "
        f"{summary['merged']['eval']['refusals']}/{summary['merged']['eval']['n']}; "
        f"{seconds:.0f} s; per rule {summary['timings_s']}"
    )
    assert base["refusals"] >= base["n"] // 3, (
        "the base model should refuse a good share of harmful prompts"
    )
    assert merged["refusals"] < base["refusals"]
    assert merged["kl"] < MAX_HELDOUT_KL
    # the merged folder reproduces the chosen trial's eval measurement (the merge applies the same edit)
    assert summary["merged"]["eval"]["kl"] == pytest.approx(
        summary["selected_trial"]["eval"]["kl"], abs=0.01
    )
