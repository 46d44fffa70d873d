"""A real single-node Slurm cluster on 127.0.0.1, started from a temporary folder in a few seconds.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` packages must be installed
(``make slurm-install``); nothing is installed here. The daemons run in the foreground as children of
the test process, with their own munge key, ports, state and logs, so they never touch a system Slurm
and are stopped by pid afterwards.

Example:
    >>> with LocalSlurm() as slurm:                                    # doctest: +SKIP
    ...     job = slurm.sbatch(["--wrap", "hostname"])
    ...     slurm.wait(job)["JobState"]
    'COMPLETED'
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}

#: Seconds between seeing a job requeued and releasing it (see :meth:`LocalSlurm.release`).
RESTART_DELAY_S = 2

SLURM_CONF = """\
ClusterName=lightcook
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
PlugStackConfig=/dev/null
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_programs() -> list[str]:
    """Slurm/munge programs not on ``PATH`` (daemons live in ``/usr/sbin``)."""
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=path) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd (node ``localhost``, ``cpus`` CPUs, partition ``debug``).

    Args:
        cpus: CPUs the node offers (``config_overrides``: independent of the machine).
        root: folder for key, config, state and logs (default: a new folder under /tmp, mode 755,
            because munged insists that the socket's parent folders be searchable by everyone).
    """

    def __init__(self, cpus: int = 2, root: str | os.PathLike | None = None) -> None:
        self.cpus = cpus
        self.root = Path(root or tempfile.mkdtemp(prefix="lightcook-slurm-", dir="/tmp"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment for clients and jobs: ``SLURM_CONF`` pointing at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{os.environ['PATH']}:/usr/sbin"}

    def start(self, timeout: float = 60) -> None:
        """Write key and config, start the three daemons, wait until the node is idle."""
        self.root.chmod(0o755)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root, cpus=self.cpus, ctld_port=_free_port(), slurmd_port=_free_port()
            )
        )
        try:
            self._start_daemons()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()

    def _start_daemons(self) -> None:
        munge = self.root / "munge"
        self._spawn(
            "munged",
            ["munged", "-F", f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'munge.socket'}",
             f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
             f"--log-file={self.root / 'log' / 'munged.log'}"],
        )  # fmt: skip
        self._wait_for(lambda: (munge / "munge.socket").exists(), 20, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait_for(lambda: self.run("sinfo", check=False).returncode == 0, 30, "slurmctld did not answer")
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            return self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle"

        self._wait_for(idle, timeout, "the node did not become idle")

    def _wait_for(self, ready: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: {what} (exited: {dead or 'none'})\n{self.logs()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20) -> None:
        """Cancel every job, wait for their steps to end, then stop the daemons (by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + timeout
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            self._stop_process(self.procs[name])
        self.procs.clear()

    @staticmethod
    def _stop_process(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients

    def run(
        self,
        *argv: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        """Run a command (a Slurm client, or anything that submits) against this cluster."""
        full = {**self.env, **(env or {})}
        done = subprocess.run(list(argv), capture_output=True, text=True, env=full, cwd=cwd, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-3000:]}")
        return done

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> str:
        """Submit (``sbatch --parsable ARGS``) and return the job id."""
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``Reason``, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job).stdout.strip()
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def release(self, job: str) -> None:
        """Start a requeued job now instead of after Slurm's 2-minute requeue delay, but not within
        ``RESTART_DELAY_S`` of its requeue: a restart allocated in the same second as the kill ends
        FAILED, apparently because the killed run's credential is revoked with a whole-second time
        stamp and the new one counts as revoked too ("Killing non-startable batch JobId=N:
        Job credential revoked" in slurmctld.log; 2 preemption runs in 10 when released at once).
        ``StartTime=now+N`` would wait for the next periodic scheduling pass (up to a minute) instead.
        """
        time.sleep(RESTART_DELAY_S)
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)

    def wait(self, job: str, timeout: float = 300, release_requeued: bool = True) -> dict[str, str]:
        """Wait until ``job`` has finished; requeued jobs start a few seconds after their requeue
        instead of after Slurm's fixed 2-minute delay (:meth:`release`)."""
        deadline = time.monotonic() + timeout
        released: set[str | None] = set()
        while (info := self.job(job))["JobState"] not in FINISHED:
            requeued = info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime"
            if release_requeued and requeued and info.get("Restarts") not in released:
                released.add(info.get("Restarts"))  # once: each call would push the start back again
                self.release(job)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {info['JobState']} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)
        return info
