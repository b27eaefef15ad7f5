"""A throwaway Slurm cluster on this machine, for tests: slurmctld and N slurmd from Debian's packages, each node its
own "host" (a network namespace with its own address, a UTS namespace with its own hostname, a private /etc/hosts).

    with SlurmCluster(Path("/tmp/x"), nodes=2) as cluster:
        job = cluster.sbatch(script, "recipe.yaml", env=...)
        cluster.wait(job, {"COMPLETED"})

Needs root (namespaces, daemons); `unavailable()` says why not, for a skip. Everything started is recorded by PID
and stopped on exit; the namespaces are deleted. Pitfalls met on the way (see also ../shared/reference/slurm-ci):
`ip netns exec` remounts /sys and slurmd then finds no cgroup mount, so nsenter is used; munge's socket folder must
be 0755; a requeued job waits `cred_expire` (120 s by default, 10 s here) before it may start again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SUBNET = "10.211.0"  # apart from the network-partition test's addresses
PREFIX = "dftslurm"  # namespace names, apart from anything else on the machine


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (None: it can), installing the packages if they are missing."""
    if os.geteuid() != 0:
        return "a test Slurm cluster needs root (network namespaces, slurmd)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"a test Slurm cluster needs `{tool}`"
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        if shutil.which("apt-get") is None:
            return "Slurm is not installed and there is no apt-get to install it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
            res = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                                 capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"could not install Slurm: {res.stderr.strip()[-500:]}"
    return None


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2):
        self.root, self.nodes = Path(root), nodes
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.pids: list[int] = []
        self.netns: list[str] = []

    # ----------------------------------------------------------------------------------------- start / stop
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for d in ("state", "munge", *(f"spool/{n}" for n in self.names)):
            (self.root / d).mkdir(parents=True)
        self._start_munge()
        hosts = ["127.0.0.1 localhost", f"{SUBNET}.254 ctl"] + [
            f"{SUBNET}.{i} {n}" for i, n in enumerate(self.names, 1)]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        self._network()
        self._write_conf()
        self._daemon("ctl", ["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        for n in self.names:
            self._daemon(n, ["/usr/sbin/slurmd", "-D", "-f", str(self.conf)], f"slurmd-{n}")
        self._wait_idle()

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(20):  # slurmd may take long to stop; nothing of it is kept
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:  # it ended between the last check and now
                    pass
        for ns in self.netns:
            # A job step still running in a node's namespace would keep it: end it first.
            left = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in left:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.pids, self.netns = [], []

    def _start_munge(self) -> None:
        m = self.root / "munge"
        subprocess.run(["mungekey", "--create", f"--keyfile={m}/munge.key"], check=True, capture_output=True)
        shutil.chown(m, "munge", "munge")
        shutil.chown(m / "munge.key", "munge", "munge")
        m.chmod(0o755)  # munged refuses a socket folder others cannot enter
        (m / "munge.key").chmod(0o600)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--key-file={m}/munge.key",
                        f"--socket={m}/munge.sock", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munged.seed"], check=True, capture_output=True, timeout=30)
        for _ in range(100):  # munged daemonizes: its PID is in the file it writes
            if (m / "munge.sock").exists() and (m / "munged.pid").is_file():
                self.pids.append(int((m / "munged.pid").read_text().split()[0]))
                return
            time.sleep(0.05)
        raise RuntimeError(f"munged did not start; see {m}/munged.log")

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def _network(self) -> None:
        hub = f"{PREFIX}-hub"
        for ns in [hub] + [f"{PREFIX}-{h}" for h in ("ctl", *self.names)]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # leftovers of a killed run
        self._ip("netns", "add", hub)
        self.netns.append(hub)
        self._ip("-n", hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", hub, "link", "set", "br0", "up")
        for i, host in [(254, "ctl")] + list(enumerate(self.names, 1)):
            ns = f"{PREFIX}-{host}"
            self._ip("netns", "add", ns)
            self.netns.append(ns)
            inner, outer = f"ds{i}a", f"ds{i}b"
            self._ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            self._ip("link", "set", inner, "netns", ns)
            self._ip("link", "set", outer, "netns", hub)
            self._ip("-n", hub, "link", "set", outer, "master", "br0")
            self._ip("-n", hub, "link", "set", outer, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", inner)
            self._ip("-n", ns, "link", "set", inner, "up")

    def _write_conf(self) -> None:
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeAddr={SUBNET}.{i} CPUs={os.cpu_count() or 2} RealMemory=4000 "
                          "State=UNKNOWN" for i, n in enumerate(self.names, 1))
        self.conf.write_text(f"""ClusterName=dftci
SlurmctldHost=ctl({SUBNET}.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.sock,cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def in_host(self, host: str, cmd: list[str]) -> list[str]:
        """`cmd` run as if on `host`: its network namespace, its hostname, its /etc/hosts."""
        script = 'hostname "$0" && mount --bind "$DFT_HOSTS" /etc/hosts && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{PREFIX}-{host}", "unshare", "--mount", "--uts",
                "/bin/sh", "-c", script, host, *cmd]

    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf), "DFT_HOSTS": str(self.root / "hosts"), **(extra or {})}

    def _daemon(self, host: str, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(self.in_host(host, cmd), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                start_new_session=True)
        self.pids.append(proc.pid)

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = self.client(["sinfo", "-h", "-o", "%T %D"], check=False)
            if res.stdout.strip() == f"idle {self.nodes}":
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-1500:] for p in self.root.glob("*.log"))
        raise RuntimeError(f"the test Slurm cluster is not idle after {timeout:.0f} s:\n{logs}")

    # ---------------------------------------------------------------------------------------------- clients
    def client(self, cmd: list[str], *, check: bool = True, env: dict | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(self.in_host("ctl", cmd), capture_output=True, text=True, env=self.env(env), cwd=cwd,
                             timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def sbatch(self, script: Path, *args: str, env: dict | None = None, cwd: Path | None = None,
               options: tuple[str, ...] = ()) -> str:
        res = self.client(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd)
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        res = self.client(["scontrol", "show", "job", "-o", job_id], check=False)
        fields = {}
        for token in res.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, states: set[str], timeout: float) -> dict:
        """Poll until the job is in one of `states` (COMPLETED, FAILED, ...); its record. TimeoutError if not."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not {sorted(states)} after {timeout:.0f} s: {info.get('JobState')}")
