"""`dist-ft slurm`: a ready batch script in the run directory, from the template in slurm/ (shipped in the package).

The template works by hand as well; what this adds is the #SBATCH header for the requested allocation, the recipe
the job runs (so that `sbatch FILE` needs no argument), the Python that has dist_ft, and a log next to the run's
metrics. `python -m dist_ft.slurm stopped --since T RECIPE` is what the batch script asks after its job step ends:
did the ranks write a checkpoint because of a signal, since T? (accelerate's agent keeps no exit status of the ranks
it stopped, so the run's own log is the only witness.)
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TEMPLATE = "dist-ft.sbatch"
LAUNCHERS = ("torchrun", "accelerate")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_grace_seconds: int = 120
    launcher: str = "torchrun"
    doctor: bool = False  # run `dist-ft doctor` on the allocation before training

    def problems(self) -> list[str]:
        p = []
        if self.nodes < 1:
            p.append(f"--nodes {self.nodes}: give at least 1")
        if self.gpus_per_node < 0:
            p.append(f"--gpus-per-node {self.gpus_per_node}: give 0 (CPU processes) or more")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            p.append(f"--procs-per-node {self.procs_per_node}: give at least 1")
        if self.time is not None and not _TIME.match(self.time):
            p.append(f"--time {self.time}: use Slurm's format, e.g. 04:00:00 or 2-00:00:00")
        if not 0 < self.signal_grace_seconds <= 65535:
            p.append(f"--signal-grace-seconds {self.signal_grace_seconds}: give 1..65535 (Slurm's limit); enough "
                     "for one step and one checkpoint")
        if self.launcher not in LAUNCHERS:
            p.append(f"--launcher {self.launcher}: use one of {', '.join(LAUNCHERS)}")
        return p

    def sbatch_lines(self, log: Path) -> list[str]:
        lines = [f"--job-name={self.job_name or 'dist-ft'}", f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            lines.append(f"--cpus-per-task={self.cpus_per_task}")
        for flag, value in (("partition", self.partition), ("time", self.time), ("account", self.account)):
            if value:
                lines.append(f"--{flag}={value}")
        lines += [f"--signal=B:USR1@{self.signal_grace_seconds}", "--requeue", "--open-mode=append",
                  f"--output={log}"]
        return [f"#SBATCH {line}" for line in lines]


def template_text() -> str:
    return (resources.files("dist_ft") / "templates" / "slurm" / TEMPLATE).read_text(encoding="utf-8")


def render(job: SlurmJob, recipe_path: Path, overrides: list[str], run_dir: Path, python: str) -> str:
    """The template with this job's #SBATCH header and defaults filled in; every other line unchanged."""
    out = []
    header_done = False
    for line in template_text().splitlines():
        if line.startswith("#SBATCH "):
            if not header_done:
                out += job.sbatch_lines(run_dir / "slurm" / "slurm-%j.out")
                header_done = True
            continue
        out.append(line)
        if line.startswith("# dist-ft slurm: settings of this copy"):
            procs = job.procs_per_node or job.gpus_per_node or 1
            argv = " ".join(shlex.quote(a) for a in [str(recipe_path.resolve()), *overrides])
            out += [f"if [ $# -eq 0 ]; then set -- {argv}; fi",
                    f"export DIST_FT_PYTHON=${{DIST_FT_PYTHON:-{shlex.quote(python)}}}",
                    f"export DIST_FT_LAUNCHER=${{DIST_FT_LAUNCHER:-{job.launcher}}}",
                    f"export DIST_FT_PROCS_PER_NODE=${{DIST_FT_PROCS_PER_NODE:-{procs}}}",
                    f"export DIST_FT_SIGNAL_GRACE_SECONDS={job.signal_grace_seconds}",
                    f"export DIST_FT_DOCTOR=${{DIST_FT_DOCTOR:-{int(job.doctor)}}}"]
    return "\n".join(out) + "\n"


def write_job(job: SlurmJob, recipe_path: Path, overrides: list[str], run_dir: Path,
              python: str = sys.executable) -> Path:
    folder = run_dir / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.sbatch"
    path.write_text(render(job, recipe_path, overrides, run_dir, python), encoding="utf-8")
    path.chmod(0o755)
    return path


def submit(path: Path) -> str:
    """sbatch the file; the job id. Raises with sbatch's own message when it refuses."""
    res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip().split(";")[0]


def _stopped(argv: list[str]) -> int:
    from .config import load_recipe
    from .telemetry.progress import stopped_since

    p = argparse.ArgumentParser(prog="python -m dist_ft.slurm stopped")
    p.add_argument("--since", type=float, required=True)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    record = stopped_since(Path(load_recipe(a.recipe, a.overrides).output_dir), a.since)
    if record is None:
        return 1
    print(f"[dist_ft] the ranks stopped after step {record['step']} ({record['reason']}) with a checkpoint")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["stopped"]:
        sys.exit("usage: python -m dist_ft.slurm stopped --since EPOCH RECIPE [overrides]")
    sys.exit(_stopped(sys.argv[2:]))
