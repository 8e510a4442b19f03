"""A throwaway one-node SLURM cluster on localhost, to run `profiles/slurm` for real.

Debian's `slurm-wlm` (22.05 on Debian 12) and `munge` run as root: a private munged, slurmctld
and slurmd for one node named after `hostname -s`, with all state, logs and the munge key in
one temporary folder. The node advertises two fake GPUs so that `--gpus=1` jobs run on a
machine without one.

Findings that shaped it (snakemake 9.27.1, snakemake-executor-plugin-slurm 2.8.0, jobstep 0.6.1):
- The jobstep plugin strips every SLURM_* variable before its inner `srun`, SLURM_CONF
  included, so srun inside the job only finds the configuration at the compiled-in default
  /etc/slurm/slurm.conf. The cluster therefore writes /etc/slurm/slurm.conf and gres.conf
  (marked as ours, refused if someone else's is there) and removes them on stop.
- There is no slurmdbd: `sacct` exits 1 ("Slurm accounting storage is disabled"), also with
  jobcomp/filetxt, so the plugin must poll with `--slurm-status-command squeue`, which sees
  finished jobs for MinJobAge (300 s). `sacctmgr` fails and `sshare` prints nothing, so the
  plugin skips account validation with a warning and any `-A` string is accepted.
- A gres/gpu without `File=` is dropped by slurmd ("Removing file-less GPU") and the node goes
  INVAL; regular files are "not a valid character device". Two character devices that every
  Linux has, /dev/null and /dev/zero, give a clean `Gres=gpu:2`; with task/none nothing is
  bound, SLURM only sets CUDA_VISIBLE_DEVICES.

Use as a pytest fixture (`slurm_cluster`, session scope; it skips with the reason when SLURM
cannot be used) or by hand: `python tests/slurm_cluster.py up|down|status`.
Installing the packages is allowed with ABLITERATE_INSTALL_SLURM=1 or CI=true (root + apt-get).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPO / "profiles" / "slurm"
ETC = Path("/etc/slurm")
# First line of every file we write to /etc/slurm: only files carrying it are ever replaced.
MARKER = "# abliterate tests/slurm_cluster.py"
# Where `python tests/slurm_cluster.py up` keeps its state (the fixture uses a pytest tmp dir).
CLI_ROOT = Path(tempfile.gettempdir()) / "abliterate-slurm"
ACCOUNT = "local"
PARTITION = "debug"
FAKE_GPUS = ("/dev/null", "/dev/zero")
# sbin holds the daemons and is not on a normal user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
APT_PACKAGES = ("slurm-wlm", "munge")


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def install_allowed() -> bool:
    return os.environ.get("ABLITERATE_INSTALL_SLURM") == "1" or os.environ.get("CI") == "true"


def ensure_slurm() -> str | None:
    """Install SLURM when allowed and missing; return why it cannot be used, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch") if which(d) is None]
    if missing:
        if not install_allowed():
            return (
                f"SLURM not installed ({', '.join(missing)} missing); set "
                "ABLITERATE_INSTALL_SLURM=1 (root, apt-get) or run .ci/install-slurm.sh"
            )
        if os.geteuid() != 0 or which("apt-get") is None:
            return "SLURM not installed and cannot install it: needs root and apt-get"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
        ):
            done = subprocess.run(
                cmd, env=env, check=False, capture_output=True, text=True, timeout=900
            )
            if done.returncode != 0:
                return f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
    # slurmd must run as root to start jobs as their users, and the config must sit in /etc.
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd, /etc/slurm/slurm.conf)"
    for name in ("slurm.conf", "gres.conf"):
        path = ETC / name
        if path.exists() and not path.read_text().startswith(MARKER):
            return f"{path} belongs to another SLURM setup; not touching it"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hardware() -> dict[str, int]:
    """The node line slurmd itself detects (`slurmd -C`), so the node registers cleanly."""
    out = subprocess.run(
        [which("slurmd"), "-C"], check=False, capture_output=True, text=True, timeout=30
    )
    fields = dict(re.findall(r"(\w+)=(\d+)", out.stdout.splitlines()[0] if out.stdout else ""))
    cpus = int(fields.get("CPUs", os.cpu_count() or 1))
    memory = int(fields.get("RealMemory", 1024))
    return {"cpus": cpus, "memory_mb": memory}


@dataclass
class LocalSlurmCluster:
    """One node on localhost; everything but /etc/slurm/{slurm,gres}.conf lives under `root`."""

    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    cpus: int | None = None  # None: what slurmd detects
    memory_mb: int | None = None  # None: 85 % of RAM, leaving room for the daemons
    partition: str = PARTITION
    account: str = ACCOUNT

    @property
    def env(self) -> dict[str, str]:
        """Variables that point `profiles/slurm` at this cluster (merge into os.environ)."""
        return {
            "ABLITERATE_SLURM_ACCOUNT": self.account,
            "ABLITERATE_SLURM_PARTITION": self.partition,
            "ABLITERATE_SLURM_GPU_PARTITION": self.partition,
        }

    def _paths(self) -> dict[str, Path]:
        r = self.root
        return {
            "munge_socket": r / "munge" / "munge.socket",
            "munge_key": r / "munge" / "munge.key",
            "munged_pid": r / "run" / "munged.pid",
            "slurmctld_pid": r / "run" / "slurmctld.pid",
            "slurmd_pid": r / "run" / "slurmd.pid",
            "log": r / "log",
            "state": r / "state",
            "spool": r / "spool",
            "jobcomp": r / "log" / "jobcomp.txt",
        }

    def write_config(self) -> None:
        p = self._paths()
        for d in ("munge", "run", "log", "state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket folder that others may not traverse.
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        hw = _hardware()
        cpus = self.cpus or hw["cpus"]
        memory = self.memory_mb or int(hw["memory_mb"] * 0.85)
        ctld_port, slurmd_port = _free_port(), _free_port()
        gpus = f"gpu:{len(FAKE_GPUS)}"
        conf = f"""{MARKER}
# root: {self.root}
ClusterName=abliterate
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# A private munged on its own socket and key: no system munge needed or touched.
AuthType=auth/munge
AuthInfo=socket={p["munge_socket"]}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={p["state"]}
SlurmdSpoolDir={p["spool"]}
SlurmctldPidFile={p["slurmctld_pid"]}
SlurmdPidFile={p["slurmd_pid"]}
SlurmctldLogFile={p["log"] / "slurmctld.log"}
SlurmdLogFile={p["log"] / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in containers or gVisor: track processes by /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# cons_tres schedules --gpus; CPUs and memory are consumable so two small jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
GresTypes=gpu
# Accept CPUs/RealMemory below (or above) what slurmd detects instead of draining the node.
SlurmdParameters=config_overrides
# No slurmdbd: sacct does not work (see module docstring); jobs are polled with squeue, and
# finished jobs stay visible to it for MinJobAge seconds. jobcomp/filetxt keeps a record of
# every finished job for tests (LocalSlurmCluster.finished_jobs).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={p["jobcomp"]}
MinJobAge=300
ReturnToService=2
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres={gpus} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        # slurmd drops a GPU without File=, and wants character devices: see module docstring.
        gres = (
            MARKER + "\n" + "".join(f"NodeName={self.node} Name=gpu File={f}\n" for f in FAKE_GPUS)
        )
        ETC.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", conf), ("gres.conf", gres)):
            tmp = ETC / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, ETC / name)
        if not p["munge_key"].exists():
            p["munge_key"].write_bytes(os.urandom(1024))
        os.chmod(p["munge_key"], 0o600)

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        p = self._paths()
        self.write_config()
        # --force: munged otherwise refuses root and world-writable parents such as /tmp.
        _run(
            [
                which("munged"),
                "--force",
                f"--socket={p['munge_socket']}",
                f"--key-file={p['munge_key']}",
                f"--pid-file={p['munged_pid']}",
                f"--log-file={p['log'] / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'seed'}",
            ]
        )
        conf = str(ETC / "slurm.conf")
        # -c: a fresh cluster, ignore any state left by a killed run.
        _run([which("slurmctld"), "-c", "-f", conf])
        _run([which("slurmd"), "-f", conf, "-N", self.node])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-n", self.node, "-o", "%t"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            )
            state = out.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"node {self.node} not idle after {timeout} s (state {state!r}):\n" + self.log_tail()
        )

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop the daemons, remove /etc/slurm files we wrote."""
        p = self._paths()
        if p["slurmctld_pid"].exists() and which("scancel"):
            # A dead controller (a killed session's stale files) makes scancel retry until its
            # timeout: the daemons are stopped below either way, and that ends their jobs.
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    ["scancel", "--full", "--user", "root"],
                    check=False,
                    capture_output=True,
                    timeout=10,
                )
        for name, program in (("slurmd_pid", "slurmd"), ("slurmctld_pid", "slurmctld"), ("munged_pid", "munged")):
            _kill_pidfile(p[name], program)
        for name in ("slurm.conf", "gres.conf"):
            path = ETC / name
            if path.exists() and path.read_text().startswith(MARKER):
                path.unlink()

    def finished_jobs(self) -> list[dict[str, str]]:
        """One dict per finished job (JobId, Name, JobState, Partition, Account, ...)."""
        path = self._paths()["jobcomp"]
        if not path.exists():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines()]

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for log in sorted(self._paths()["log"].glob("*.log")):
            parts.append(f"--- {log}\n" + "\n".join(log.read_text().splitlines()[-lines:]))
        return "\n".join(parts)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


def _kill_pidfile(pidfile: Path, program: str, timeout: float = 15) -> None:
    """Stop the one process named in `pidfile` if it is still `program`: SIGTERM, then SIGKILL
    after `timeout`. A stale file from an earlier boot may name a pid since reused by another process."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return
    if _program(pid) != program:
        pidfile.unlink(missing_ok=True)
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        if not _signal(pid, sig):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _signal(pid, 0):
            time.sleep(0.1)
        if not _signal(pid, 0):
            break
    pidfile.unlink(missing_ok=True)


def _program(pid: int) -> str | None:
    """The executable name of process `pid` (Linux /proc), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _signal(pid: int, sig: int) -> bool:
    """Send `sig`; False when the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def configured_cluster() -> LocalSlurmCluster | None:
    """The cluster our /etc/slurm/slurm.conf describes, running or not."""
    conf = ETC / "slurm.conf"
    if not conf.exists() or not conf.read_text().startswith(MARKER):
        return None
    text = conf.read_text()
    root = re.search(r"^# root: (.+)$", text, re.MULTILINE)
    node = re.search(r"^NodeName=(\S+)", text, re.MULTILINE)
    if not root or not node:
        return None
    return LocalSlurmCluster(root=Path(root.group(1)), node=node.group(1))


def running_cluster() -> LocalSlurmCluster | None:
    """The configured cluster if its controller answers."""
    cluster = configured_cluster()
    if cluster is None or which("sinfo") is None:
        return None
    alive = subprocess.run(["sinfo", "-h"], check=False, capture_output=True, text=True, timeout=10)
    return cluster if alive.returncode == 0 else None


def run_snakemake_on_slurm(
    workdir: Path,
    snakefile: Path,
    extra_args: list[str],
    timeout: int,
    cluster: LocalSlurmCluster | None = None,
) -> subprocess.CompletedProcess:
    """Run snakemake with `profiles/slurm` against the local cluster; output is captured.

    Only what this cluster needs is added to the profile: its account and partition (through
    the profile's environment variables), squeue polling (no slurmdbd), and short poll
    intervals. Successful jobs keep their SLURM logs under <workdir>/results/logs/slurm.
    """
    env = dict(os.environ)
    env.update((cluster or LocalSlurmCluster(root=CLI_ROOT)).env)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        str(SLURM_PROFILE),
        "--snakefile",
        str(snakefile),
        "--directory",
        str(workdir),
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "2",
        "--slurm-keep-successful-logs",
        *extra_args,
    ]
    return subprocess.run(
        cmd, cwd=workdir, env=env, check=False, capture_output=True, text=True, timeout=timeout
    )


def submitted_job_ids(snakemake_output: str) -> dict[str, str]:
    """Rule name -> SLURM job id, read from the 'submitted with SLURM jobid' log lines."""
    found = re.findall(r"with SLURM jobid (\d+) \(log: \S*/rule_([^/]+)/", snakemake_output)
    return {rule: job for job, rule in found}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node cluster; skips the test when SLURM cannot be used here."""
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    existing = running_cluster()
    if existing is not None:
        # Brought up by hand (`python tests/slurm_cluster.py up`): use it, leave it running.
        yield existing
        return
    stale = configured_cluster()
    if stale is not None:  # a killed session's daemons and /etc files
        stale.stop()
    cluster = LocalSlurmCluster(root=tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        cluster.stop()
        pytest.skip(f"local SLURM cluster did not start: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "status"
    if command == "up":
        reason = ensure_slurm()
        if reason:
            print(f"cannot start SLURM: {reason}", file=sys.stderr)
            return 1
        if running_cluster() is None:
            stale = configured_cluster()
            if stale is not None:  # a killed session's daemons and /etc files
                stale.stop()
            LocalSlurmCluster(root=CLI_ROOT).start()
        cluster = running_cluster()
        print(f"up: node {cluster.node}, state in {cluster.root}; for profiles/slurm:")
        for key, value in cluster.env.items():
            print(f"export {key}={value}")
        print("and add --slurm-status-command squeue (no slurmdbd here)")
        return 0
    if command == "down":
        (configured_cluster() or LocalSlurmCluster(root=CLI_ROOT)).stop()
        print("down")
        return 0
    if command == "status":
        cluster = running_cluster()
        print(f"up: node {cluster.node}, state in {cluster.root}" if cluster else "down")
        return 0 if cluster else 1
    print(f"usage: {argv[0]} up|down|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
