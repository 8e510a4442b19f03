"""Modules that Snakemake's parse and the CPU-only rules (prompts, trials) import load without torch,
which costs seconds per process."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["workflow_config", "model_source", "io", "study", "selection"])
def test_module_imports_without_torch(module):
    code = f"import sys, abliterate.{module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
