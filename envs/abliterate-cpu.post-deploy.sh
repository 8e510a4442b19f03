#!/usr/bin/env bash
# Snakemake runs this inside the environment of the .yaml file beside it, once, right after creating
# it ("post-deploy scripts" in Snakemake's deployment docs). It installs abliterate, editable, from the
# checkout whose Snakefile set ABLITERATE_SOURCE (its root): a path in the .yaml file cannot name the
# checkout, because conda reads Snakemake's copy of that file under .snakemake/conda/. The
# dependencies are in the .yaml file, pinned as constraints.txt pins them, hence --no-deps.
set -euo pipefail
: "${ABLITERATE_SOURCE:?is set by the Snakefile; create the environment through snakemake}"
python -m pip install --no-deps -e "$ABLITERATE_SOURCE"
