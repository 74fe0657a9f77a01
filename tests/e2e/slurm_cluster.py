"""A real single-host SLURM for the cluster tests: munged, slurmctld and slurmd on localhost, all state in one
temp folder, started as root from Debian's ``slurm-wlm`` and ``munge`` (scripts/install_system_packages.sh)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol", "squeue", "sinfo")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def why_not_available() -> str | None:
    """None if a SLURM can be started here, else the one-line reason."""
    if os.geteuid() != 0:
        return "the single-host SLURM needs root (slurmd runs jobs as their user)"
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; scripts/install_system_packages.sh installs it)"
    return None


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports of 127.0.0.1 that nothing listens on now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class SlurmCluster:
    """One node (this host, 4 CPUs as SLURM counts them) in one partition; ``env`` runs its client commands. Its
    scheduler looks at pending jobs every second (``sched_interval=1``; SLURM's default is 60 s), so a requeued job
    starts as soon as a test releases it, not up to a minute later."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(folder / "slurm.conf")
        self._pid_files = [folder / name for name in ("slurmd.pid", "slurmctld.pid", "munged.pid")]

    def start(self, timeout: float = 30) -> None:
        f = self.folder
        f.chmod(0o755)  # munged: its socket's folder must be reachable by every user
        for sub in ("state", "spool"):
            (f / sub).mkdir()
        key = f / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={f / 'munge.sock'}",
                        f"--pid-file={f / 'munged.pid'}", f"--log-file={f / 'munged.log'}",
                        f"--seed-file={f / 'munged.seed'}"], check=True, capture_output=True)
        ctld_port, slurmd_port = free_ports(2)
        (f / "slurm.conf").write_text(f"""ClusterName=amaxtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={f / 'munge.sock'}
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'slurmctld.log'}
SlurmdLogFile={f / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=10
NodeName={self.host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True, capture_output=True)
        subprocess.run(["slurmd"], env=self.env, check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM did not come up within {timeout} s (node state {state!r}); see {f}")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started (by their pid files)."""
        self.run("scancel", "--user", "root", check=False)
        pids = []
        for pid_file in self._pid_files:
            try:
                pids.append(int(pid_file.read_text().split()[0]))
                os.kill(pids[-1], signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
        deadline = time.monotonic() + 3
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def run(self, *command: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command (``srun``, ``sbatch``, ``scontrol``, ...) against this cluster."""
        env = {**self.env, **kwargs.pop("env", {})}
        return subprocess.run(list(command), env=env, capture_output=True, text=True, check=check, timeout=timeout,
                              **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait(self, job_id: str, until, timeout: float = 120) -> dict[str, str]:
        """Poll the job until ``until(fields)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if until(fields):
                return fields
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {fields.get('JobState')} after {timeout} s")

    def wait_done(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        return self.wait(job_id, lambda f: f.get("JobState") in FINAL, timeout)
