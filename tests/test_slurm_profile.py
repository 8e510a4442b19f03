"""profiles/slurm on a real (local, one-node) SLURM cluster: a CPU job and a GPU job via sbatch.

Skips unless SLURM is installed or may be installed (see tests/slurm_cluster.py).
About 1.5 min on 2 busy cores: the plugin's status polling backs off by 10 s per round.
"""

import importlib.util
import subprocess
import sys

import pytest
from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    REPO,
    run_snakemake_on_slurm,
    slurm_cluster,
    submitted_job_ids,
)

SNAKEFILE = """\
localrules:
    all,


rule all:
    input:
        "cpu.txt",
        "gpu.txt",


rule cpu_step:
    output:
        "cpu.txt",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "echo job=${{SLURM_JOB_ID-}} partition=${{SLURM_JOB_PARTITION-}} > {output}"


rule gpu_step:
    input:
        "cpu.txt",
    output:
        "gpu.txt",
    threads: 1
    resources:
        gpu=1,
        mem_mb=1000,
        runtime=5,
    shell:
        "echo job=${{SLURM_JOB_ID-}} cuda=${{CUDA_VISIBLE_DEVICES-}} > {output}"
"""


def _fields(path):
    return dict(item.split("=", 1) for item in path.read_text().split())


@pytest.mark.slow
def test_profile_runs_cpu_and_gpu_jobs_through_sbatch(slurm_cluster, tmp_path):  # noqa: F811
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(SNAKEFILE)

    done = run_snakemake_on_slurm(tmp_path, snakefile, [], timeout=170, cluster=slurm_cluster)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:] + "\n" + slurm_cluster.log_tail()

    jobs = submitted_job_ids(output)
    assert set(jobs) == {"cpu_step", "gpu_step"}, output[-4000:]
    cpu, gpu = _fields(tmp_path / "cpu.txt"), _fields(tmp_path / "gpu.txt")
    # The shell ran inside the very SLURM jobs snakemake submitted, in the profile's partition.
    assert cpu["job"] == jobs["cpu_step"]
    assert gpu["job"] == jobs["gpu_step"]
    assert cpu["partition"] == slurm_cluster.partition
    # gpu=1 became --gpus=1: SLURM allocated one of the node's GRES GPUs to the job.
    assert gpu["cuda"] in {"0", "1"}
    shown = subprocess.run(
        ["scontrol", "show", "job", jobs["gpu_step"]],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "gres:gpu:1" in shown.stdout
    finished = {job["JobId"]: job for job in slurm_cluster.finished_jobs()}
    for rule, job_id in jobs.items():
        assert finished[job_id]["JobState"] == "COMPLETED", rule
        assert finished[job_id]["Account"] == slurm_cluster.account, rule
    # Successful jobs keep their sbatch log in the profile's slurm-logdir.
    assert (tmp_path / "results/logs/slurm/rule_gpu_step" / f"{jobs['gpu_step']}.log").exists()


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_profile_parses_in_a_dry_run(profile, tmp_path):
    """Both profiles load and schedule the tiny workflow, without any cluster."""
    if profile == "slurm" and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm not installed")
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(SNAKEFILE)
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / profile)]
    cmd += ["--snakefile", str(snakefile), "--directory", str(tmp_path), "--dry-run"]
    done = subprocess.run(
        cmd, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_step" in done.stdout
