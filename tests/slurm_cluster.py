"""A real single-node Slurm on this machine, for tests/test_slurm.py (and by hand).

    python tests/slurm_cluster.py            # start it, print `export SLURM_CONF=...`, wait; Ctrl-C stops it

Debian's ``slurm-wlm`` with ``munge`` for authentication and ``slurmdbd`` on a private MariaDB for
accounting (submitit reads job states through ``sacct``; without accounting a cancelled job's result
waits forever). Everything lives in one temporary folder: configuration, spool, state, logs, the
database; the node line comes from ``slurmd -C``; ``proctrack/linuxproc`` and ``task/none`` need no
cgroups. Ports are picked free. The daemons run as root (``SlurmUser=root``) and are stopped by PID.

Install the packages first (``.ci/slurm`` does): ``apt-get install slurm-wlm munge slurmdbd mariadb-server``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge", "slurmdbd", "mariadb-server")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


class ClusterError(RuntimeError):
    """The cluster could not be started; the message names the daemon and its log."""


def missing() -> list[str]:
    """The daemons (and clients) this needs that are not installed."""
    tools = [*DAEMONS, "mariadb-install-db", "sacctmgr", "sinfo", "sbatch"]
    return [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait(check, what: str, log: Path | None, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text()[-2000:] if log and log.exists() else "(no log)"
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s; {log}:\n{tail}")


def _ok(cmd: list[str], env: dict | None = None) -> bool:
    return subprocess.run(cmd, capture_output=True, env=env).returncode == 0


class Cluster:
    """``with Cluster() as c:`` a running single-node Slurm; ``c.env`` holds ``SLURM_CONF``."""

    def __init__(self, cluster: str = "lnkit"):
        self.name = cluster
        self.root = Path(tempfile.mkdtemp(prefix="lnkit-slurm-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.pidfiles: dict[str, Path] = {}
        self.env = dict(os.environ)

    # -- the pieces -------------------------------------------------------------------------------------
    def _munge(self) -> None:
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        if _ok(["bash", "-c", "munge -n | unmunge"]):
            return  # a munged is already serving this machine
        log = self.root / "munged.log"
        self.procs["munged"] = subprocess.Popen(
            ["runuser", "-u", "munge", "--", _exe("munged"), "--foreground", "--force", f"--log-file={log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: _ok(["bash", "-c", "munge -n | unmunge"]), "munged", log)

    def _database(self) -> tuple[int, str]:
        data, sock, log = self.root / "db", self.root / "mysql.sock", self.root / "mariadb.log"
        subprocess.run([_exe("mariadb-install-db"), f"--datadir={data}", "--user=root", "--auth-root-authentication-method=socket",
                        "--skip-test-db"], check=True, capture_output=True)
        port = _free_port()
        self.procs["mariadbd"] = subprocess.Popen(
            [_exe("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={port}",
             "--bind-address=127.0.0.1", "--user=root", f"--log-error={log}", f"--pid-file={self.root / 'mariadb.pid'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: _ok(["mariadb", f"--socket={sock}", "-u", "root", "-e", "select 1"]), "mariadbd", log)
        password = os.urandom(8).hex()
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        subprocess.run(["mariadb", f"--socket={sock}", "-u", "root", "-e", sql], check=True, capture_output=True)
        return port, password

    def _configs(self, db_port: int, db_password: str) -> None:
        r = self.root
        for d in ("state", "spool", "run"):
            (r / d).mkdir()
        node = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = node.split()[0].split("=", 1)[1]
        self.dbd_port, ctld, slurmd = _free_port(), _free_port(), _free_port()
        self.pidfiles = {"slurmdbd": r / "run/slurmdbd.pid", "slurmctld": r / "run/slurmctld.pid",
                         "slurmd": r / "run/slurmd.pid"}
        (r / "slurm.conf").write_text(f"""\
ClusterName={self.name}
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.pidfiles['slurmctld']}
SlurmdPidFile={self.pidfiles['slurmd']}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.dbd_port}
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=300
{node}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        dbd = r / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
DbdHost=localhost
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={self.pidfiles['slurmdbd']}
LogFile={r / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=slurm
StoragePass={db_password}
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)
        self.env["SLURM_CONF"] = str(r / "slurm.conf")

    def _daemon(self, name: str, ready, timeout: float = 60.0) -> None:
        self.procs[name] = subprocess.Popen([_exe(name), "-D"], env=self.env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.STDOUT)
        _wait(lambda: self.procs[name].poll() is None and ready(), name, self.root / f"{name}.log", timeout)

    # -- start and stop ---------------------------------------------------------------------------------
    def start(self) -> Cluster:
        gone = missing()
        if gone:
            raise ClusterError(f"not installed: {', '.join(gone)} (apt-get install {' '.join(PACKAGES)})")
        try:
            self._munge()
            self._configs(*self._database())
            self._daemon("slurmdbd", lambda: _ok(["sacctmgr", "-n", "list", "cluster"], self.env))
            _ok(["sacctmgr", "-i", "add", "cluster", self.name], self.env)
            self._daemon("slurmctld", lambda: _ok(["sinfo"], self.env))
            self._daemon("slurmd", lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                                                   capture_output=True, text=True).stdout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every daemon this started (slurmd first, the database last) and remove the folder."""
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> int:
    with Cluster() as c:
        print(f"export SLURM_CONF={c.env['SLURM_CONF']}   # Ctrl-C stops the cluster", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
