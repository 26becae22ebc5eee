"""A real single-node SLURM cluster on 127.0.0.1 for tests: munge, MariaDB, slurmdbd, slurmctld and slurmd.

Everything (keys, sockets, database, state, spool, logs) lives in one temporary folder; the daemons run in the
foreground as children of the test process, so that `LocalSlurmCluster.stop` ends exactly them. Clients (`sbatch`,
`sacct`, `scancel`, ...) find the cluster through ``SLURM_CONF`` in `LocalSlurmCluster.env`.

Needs Debian's slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server; `install_slurm` installs them
with apt-get when run as root. The node offers ``cpus`` CPUs and ``memory_mb`` MB; jobs whose resident memory
exceeds their ``--mem`` are killed by the accounting poll (``JobAcctGatherParams=OverMemoryKill``), since memory
cgroups are not available in every container.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server"]
PROGRAMS = [
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "sbatch",
    "sacct",
    "sacctmgr",
    "munged",
    "mungekey",
    "mariadb-install-db",
    "mariadbd",
    "mariadb",
    "unshare",
]
CLUSTER = "abctest"
ACCOUNT = "abc"
PARTITION = "cpu"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be installed or started here (no root, no apt-get, a daemon did not come up)."""


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def install_slurm(timeout_s: float = 900) -> None:
    """Install the Debian packages when a program is missing (root and apt-get required)."""
    if not missing_programs():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"missing {missing_programs()} and cannot install them (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"],
        ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", *PACKAGES],
    ):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed: {proc.stderr[-2000:]}")
    if missing_programs():
        raise ClusterUnavailable(f"still missing after apt-get install: {missing_programs()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurmCluster:
    """One node (this machine, ``cpus`` CPUs, ``memory_mb`` MB) in partition `PARTITION`, accounting on.

    Usage: ``cluster = LocalSlurmCluster(folder); cluster.start(); ...; cluster.stop()`` (stop is safe to call
    after a failed start). Account `ACCOUNT` holds user root.
    """

    def __init__(self, folder: Path, cpus: int = 2, memory_mb: int | None = None) -> None:
        self.folder = folder
        self.cpus = cpus
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        self.memory_mb = memory_mb or int(total_mb * 0.9)
        self.node = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.logs = {name: folder / f"{name}.log" for name in ("munged", "slurmdbd", "slurmctld", "slurmd")}
        self.etc = folder / "etc"
        self.env = {**os.environ, "SLURM_CONF": str(self.etc / "slurm.conf")}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 90) -> None:
        for sub in ("munge", "db", "state", "spool", "etc"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        ports = {name: _free_port() for name in ("mysql", "dbd", "ctld", "slurmd")}
        self._start_munge()
        self._start_mariadb(ports["mysql"], timeout_s)
        self._write_configs(ports)
        self._spawn("slurmdbd", [_program("slurmdbd"), "-D"])
        self._wait("slurmdbd answers", lambda: self._ok(["sacctmgr", "-n", "list", "cluster"]), timeout_s)
        self._run(["sacctmgr", "-i", "add", "cluster", CLUSTER])
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i"])
        # Snakemake's job step drops SLURM_CONF before its `srun`, which then reads /etc/slurm/slurm.conf: slurmd
        # (and so every job) runs in a private mount namespace where /etc/slurm is this cluster's etc folder.
        self._spawn(
            "slurmd",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount --bind "$0" /etc/slurm && exec "$@"',
                str(self.etc),
                _program("slurmd"),
                "-D",
                "-N",
                self.node,
            ],
        )
        self._run(["sacctmgr", "-i", "add", "account", ACCOUNT, f"cluster={CLUSTER}"])
        self._run(["sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}", f"defaultaccount={ACCOUNT}"])
        self._wait("node idle", lambda: self._out(["sinfo", "-h", "-o", "%T"]).strip() == "idle", timeout_s)

    def stop(self) -> None:
        """Terminate the daemons this cluster started (SIGTERM, then SIGKILL after 15 s), newest first."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self.processes.clear()

    # -- clients -----------------------------------------------------------------------------------------------
    def sacct(self, *fields: str) -> list[dict[str, str]]:
        """Allocations (no steps) of all users since midnight: one dict per job, keyed by ``fields``."""
        out = self._out(["sacct", "-a", "-X", "-n", "-P", "-S", "00:00", "-o", ",".join(fields)])
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    def squeue(self) -> list[dict[str, str]]:
        """Pending and running jobs: id, name (Snakemake's comment holds the rule), state."""
        out = self._out(["squeue", "-h", "-o", "%i|%k|%T"])
        return [dict(zip(("id", "comment", "state"), line.split("|"))) for line in out.splitlines() if line]

    def describe(self) -> str:
        """The daemons' log and output tails, for failure messages."""
        logs = sorted([*self.folder.glob("*.log"), *self.folder.glob("*.out")])
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}" for log in logs)

    # -- daemons -----------------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        key = self.folder / "munge" / "munge.key"
        self._run([_program("mungekey"), "--create", f"--keyfile={key}"])
        self.munge_socket = self.folder / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                _program("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.folder / 'munge' / 'munged.pid'}",
                f"--seed-file={self.folder / 'munge' / 'seed'}",
                f"--log-file={self.logs['munged']}",
            ],
        )
        self._wait("munged socket", self.munge_socket.exists, 30)

    def _start_mariadb(self, port: int, timeout_s: float) -> None:
        datadir = self.folder / "db"
        self._run(
            [
                _program("mariadb-install-db"),
                f"--datadir={datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]
        )
        self.mysql_socket = self.folder / "db" / "mysql.sock"
        self._spawn(
            "mariadb",
            [
                _program("mariadbd"),
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.mysql_socket}",
                f"--pid-file={datadir / 'mariadb.pid'}",
                "--innodb-buffer-pool-size=64M",
                "--skip-name-resolve",
            ],
        )
        sql = (
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        self._wait(
            "mariadb", lambda: self._ok(["mariadb", f"--socket={self.mysql_socket}", "-e", "SELECT 1"]), timeout_s
        )
        self._run(["mariadb", f"--socket={self.mysql_socket}", "-e", sql])

    def _write_configs(self, ports: dict[str, int]) -> None:
        f = self.folder
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(
            auth + f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={ports['dbd']}\nSlurmUser=root\n"
            f"PidFile={f / 'slurmdbd.pid'}\nLogFile={self.logs['slurmdbd']}\nDebugLevel=info\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={ports['mysql']}\n"
            "StorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)
        (self.etc / "slurm.conf").write_text(
            auth + f"ClusterName={CLUSTER}\nSlurmctldHost={self.node}(127.0.0.1)\n"
            f"SlurmctldPort={ports['ctld']}\nSlurmdPort={ports['slurmd']}\nSlurmUser=root\nSlurmdUser=root\n"
            f"StateSaveLocation={f / 'state'}\nSlurmdSpoolDir={f / 'spool'}\n"
            f"SlurmctldPidFile={f / 'slurmctld.pid'}\nSlurmdPidFile={f / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.logs['slurmctld']}\nSlurmdLogFile={self.logs['slurmd']}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n"
            "JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=1\nJobAcctGatherParams=OverMemoryKill\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={ports['dbd']}\nAccountingStoragePass={self.munge_socket}\n"
            "AccountingStorageEnforce=associations\nAccountingStoreFlags=job_comment\n"
            "MpiDefault=none\nReturnToService=2\nSchedulerType=sched/backfill\nKillWait=5\nInactiveLimit=0\n"
            "MinJobAge=300\nSlurmctldTimeout=30\nSlurmdTimeout=30\nMailProg=/bin/true\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.folder / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.processes.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterUnavailable(f"{name} exited at once ({proc.returncode})\n{self.describe()}")

    def _wait(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"daemon(s) {dead} exited while waiting for {what}\n{self.describe()}")
            time.sleep(0.5)
        raise ClusterUnavailable(f"timed out after {timeout_s} s waiting for {what}\n{self.describe()}")

    def _ok(self, command: list[str]) -> bool:
        return subprocess.run(command, env=self.env, capture_output=True, timeout=60, check=False).returncode == 0

    def _out(self, command: list[str]) -> str:
        return self._run(command).stdout

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc
