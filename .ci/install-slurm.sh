#!/usr/bin/env bash
# Install what tests/test_slurm_profile.py needs to run profiles/slurm on a real, local SLURM:
# Debian's slurm-wlm (22.05 on Debian 12) + munge, and the pinned snakemake SLURM executor.
# Idempotent: installed packages are skipped. Needs root on Debian/Ubuntu (CI: fresh Debian 12).
# The cluster itself is started by the pytest fixture (tests/slurm_cluster.py), not here.
set -euo pipefail

# Tested together with snakemake 9.27.1; jobstep is the plugin that runs inside each job.
SLURM_PLUGIN="snakemake-executor-plugin-slurm==2.8.0"
JOBSTEP_PLUGIN="snakemake-executor-plugin-slurm-jobstep==0.6.1"

if ! command -v /usr/sbin/slurmctld >/dev/null || ! command -v /usr/sbin/slurmd >/dev/null \
    || ! command -v /usr/sbin/munged >/dev/null || ! command -v sbatch >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-slurm.sh: needs root to apt-get install slurm-wlm munge" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the recommends are ~40 optional plugin and -dev packages.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge
fi

python -m pip install --quiet "$SLURM_PLUGIN" "$JOBSTEP_PLUGIN"

echo "install-slurm.sh: $(/usr/sbin/slurmctld -V), $(python -m pip show snakemake-executor-plugin-slurm | grep ^Version)"
