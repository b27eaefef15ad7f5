"""Slurm: the batch template lints and renders; on a real (throwaway) Slurm cluster of two emulated nodes, a 2-node job
runs through each launch path, a pre-empted job checkpoints, requeues itself and resumes exactly, and a killed rank
ends the job quickly with a failing status. The cluster needs root; elsewhere those tests skip with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ft.slurm import SlurmJob, render

from conftest import FAKE_SECRETS, REPO, read_metrics, run_cli, secret_leaks, tiny_recipe, write_recipe
from slurm_cluster import SlurmCluster, unavailable

TEMPLATE = REPO / "slurm" / "dist-ft.sbatch"
STEPS = 24
TIMEOUT_S = 20


# ------------------------------------------------------------------------------------------- no cluster needed

def _rendered(tmp_path, **job) -> Path:
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.sbatch"
    path.write_text(render(SlurmJob(**job), Path("r.yaml"), ["training.max_steps=5"], tmp_path / "run", "/x/python"))
    return path


def test_the_shipped_template_is_the_one_in_slurm():
    from dist_ft.slurm import template_text
    assert template_text() == TEMPLATE.read_text()


def test_templates_pass_bash_n_and_shellcheck(tmp_path):
    files = [TEMPLATE, _rendered(tmp_path, nodes=4, gpus_per_node=8, partition="gpu", time="1-00:00:00",
                                 account="ml", job_name="ft", cpus_per_task=32),
             _rendered(tmp_path, launcher="accelerate")]
    for f in files:
        res = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert res.returncode == 0, (f, res.stderr)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", "--severity=info", *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_rendered_header_comes_from_the_options_and_nothing_is_hard_coded(tmp_path):
    text = _rendered(tmp_path, nodes=4, gpus_per_node=8, partition="gpu", time="02:00:00", account="ml",
                     signal_grace_seconds=300).read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=4" in header and "#SBATCH --gpus-per-node=8" in header
    assert "#SBATCH --partition=gpu" in header and "#SBATCH --time=02:00:00" in header
    assert "#SBATCH --account=ml" in header and "#SBATCH --signal=B:USR1@300" in header
    assert "#SBATCH --requeue" in header and f"#SBATCH --output={tmp_path}/run/slurm/slurm-%j.out" in header
    assert len(header) == len({line.split("=")[0] for line in header})  # the template's own header is gone
    assert "DIST_FT_PROCS_PER_NODE:-8" in text and "set -- " in text and "training.max_steps=5" in text
    body = text.split("# dist-ft slurm: settings of this copy")[1]
    # The rendezvous comes from the allocation, never a fixed host, port or id.
    assert "29500 + SLURM_JOB_ID % 10000" in body and '"dist-ft-$SLURM_JOB_ID"' in body
    assert "scontrol show hostnames \"$SLURM_JOB_NODELIST\"" in body
    # Per-node values are expanded by each node's shell (single-quoted), not once by the batch shell.
    assert "node_cmd='exec" in body and '--machine_rank "$SLURM_NODEID"' in body


def test_dist_ft_slurm_writes_into_the_run_dir_and_refuses_bad_options(tmp_path, tiny_llama):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out))
    res = run_cli("slurm", str(path), "--nodes", "2", "--gpus-per-node", "0", "--time", "00:30:00")
    assert res.returncode == 0, res.stderr
    job = out / "slurm" / "job.sbatch"
    assert job.is_file() and os.access(job, os.X_OK) and "#SBATCH --time=00:30:00" in job.read_text()
    # The batch script in the run directory does not make it "already used" for the job's first run.
    assert run_cli("check", str(path)).returncode == 0
    res = run_cli("slurm", str(path), "--nodes", "0", "--time", "90 minutes", "--launcher", "mpirun",
                  "training.max_steps=-1")
    assert res.returncode == 2
    for needle in ("--nodes 0", "--time 90 minutes", "--launcher mpirun", "training.max_steps"):
        assert needle in res.stderr, (needle, res.stderr)


# ------------------------------------------------------------------------------------------- on a real cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(Path("/tmp") / f"dft-slurm-{os.getpid()}", nodes=2) as c:
        yield c


def _job_env(work: Path) -> dict:
    # What a user's shell holds when they submit: the environment with dist_ft on PATH (sbatch exports it), and
    # secrets, which no file the job writes (in its working directory, run directory or $HOME) may hold.
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "HOME": str(home), **FAKE_SECRETS}


def _write_job(tmp_path, model, name, launcher="torchrun", strategy="ddp", doctor=False) -> tuple[Path, Path]:
    out = tmp_path / name
    recipe = tiny_recipe(model, out, method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                         training={"max_steps": STEPS},
                         distributed={"timeout_seconds": TIMEOUT_S, "strategy": strategy},
                         checkpoint={"every_steps": 0})
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    res = run_cli("slurm", str(path), "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1",
                  "--launcher", launcher, "--signal-grace-seconds", "60", *(["--doctor"] if doctor else []))
    assert res.returncode == 0, res.stderr
    return out, out / "slurm" / "job.sbatch"


def _log(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (out / "slurm").glob("slurm-*.out"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, tiny_llama):
    """An uninterrupted 2-node job through torchrun: both the launch-path test and the pre-emption reference."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    out, script = _write_job(tmp, tiny_llama, "straight", doctor=True)
    job = cluster.sbatch(script, env=_job_env(tmp), cwd=tmp)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    assert not secret_leaks(tmp), secret_leaks(tmp)
    return out, info


def _assert_two_nodes(out: Path, info: dict) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, _log(out))
    start = [r for r in _records(out) if r.get("event") == "start"][-1]
    assert start["world_size"] == 2 and sorted(start["hosts"]) == ["n1", "n2"], start
    assert (out / "final").is_dir()
    assert len(read_metrics(out)[0]) == STEPS


def _assert_doctor_passed(out: Path) -> None:
    """`dist-ft slurm --doctor`: the job checked its allocation (2 nodes, one link between them) before training."""
    doc = json.loads((out / "doctor" / "doctor.json").read_text())
    assert doc["verdict"] == "pass" and doc["world_size"] == 2, doc
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["rendezvous"]["details"]["expected"] == 2 and checks["rendezvous"]["details"]["nodes"] == 2
    links = checks["links"]["details"]["links"]
    assert [r["kind"] for r in links] == ["inter-node"] and {"n1", "n2"} <= set(links[0]["between"].replace(
        "(", " ").split()), links
    assert checks["stop signal"]["details"]["grace_seconds"] == 60
    assert "[doctor] PASS" in _log(out) and _log(out).index("[doctor] PASS") < _log(out).index("[eval] before")


def test_two_node_job_through_torchrun(reference):
    _assert_two_nodes(*reference)
    _assert_doctor_passed(reference[0])


def test_two_node_job_through_accelerate(cluster, tmp_path, tiny_llama, reference):
    out, script = _write_job(tmp_path, tiny_llama, "accel", launcher="accelerate", doctor=True)
    job = cluster.sbatch(script, env=_job_env(tmp_path), cwd=tmp_path)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    _assert_two_nodes(out, info)
    _assert_doctor_passed(out)
    assert "launcher accelerate" in _log(out)
    assert not secret_leaks(tmp_path), secret_leaks(tmp_path)
    # Same recipe, same world size, other launcher: the same training.
    ref = {r["step"]: r["loss"] for r in read_metrics(reference[0])[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(out)[0]}
    assert max(abs(ref[s] - got[s]) for s in ref) <= 1e-5


@pytest.mark.slow  # ~1 min; the same launch path as the accelerate test, with DeepSpeed's engine
def test_two_node_deepspeed_job_through_accelerate(cluster, tmp_path, tiny_llama, reference):
    """ZeRO-2 from the recipe, accelerate's DeepSpeed config for the launcher (its JSON path is relative to the
    repository, where the job is submitted from)."""
    out, script = _write_job(tmp_path, tiny_llama, "zero2", launcher="accelerate", strategy="zero2")
    env = {**_job_env(tmp_path), "DIST_FT_ACCELERATE_CONFIG": str(REPO / "launch" / "accelerate" / "zero2.yaml")}
    assert not (REPO / ".deepspeed_env").exists()
    job = cluster.sbatch(script, env=env, cwd=REPO)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600)
    _assert_two_nodes(out, info)
    assert "strategy zero2" in _log(out)
    # A multi-node DeepSpeed launch through accelerate writes the whole environment to .deepspeed_env in the
    # working directory unless its multi-node launcher is `standard` (the template's).
    assert not (REPO / ".deepspeed_env").exists() and not secret_leaks(tmp_path), secret_leaks(tmp_path)
    ref = [r["loss"] for r in read_metrics(reference[0])[0]]
    got = [r["loss"] for r in read_metrics(out)[0]]
    assert max(abs(a - b) / b for a, b in zip(got, ref)) < 1e-4, (got, ref)


def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path, tiny_llama, reference):
    out, script = _write_job(tmp_path, tiny_llama, "preempted")
    # Slow steps (0.3 s each) so that the signal lands mid-run; the numbers do not depend on it.
    job = cluster.sbatch(script, env={**_job_env(tmp_path), "DIST_FT_FAULT": "slow:0.3"}, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and len(read_metrics(out)[0]) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no training steps: {cluster.job(job)} {_log(out)}")
    t_signal = time.time()
    cluster.client(["scancel", "--signal=USR1", "--batch", job])
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    log = _log(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert info["Restarts"] == "1", info
    assert "requeueing job" in log and "(restart 1)" in log, log[-4000:]
    records = _records(out)
    stopped = [r for r in records if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGTERM", stopped
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["run_id"] == starts[0]["run_id"], starts  # same telemetry run
    assert starts[1]["resumed_from"].endswith(f"step-{stopped[0]['step']:08d}")
    steps = [r["step"] for r in read_metrics(out)[0]]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: nothing repeated, nothing skipped
    ref = {r["step"]: r["loss"] for r in read_metrics(reference[0])[0]}
    got = {r["step"]: r["loss"] for r in read_metrics(out)[0]}
    assert max(abs(ref[s] - got[s]) for s in ref) <= 1e-6, (ref, got)
    saved = next(r for r in records if r.get("event") == "checkpoint" and r["time"] >= t_signal)
    first_resumed = next(r for r in records if "loss" in r and r["time"] > starts[1]["time"])
    print(f"\n[slurm] signal -> checkpoint written: {saved['time'] - t_signal:.2f} s; stop -> requeued job's "
          f"start: {starts[1]['time'] - stopped[0]['time']:.2f} s; -> first resumed step: "
          f"{first_resumed['time'] - stopped[0]['time']:.2f} s (cred_expire 10 s here, 120 s by default)")


def test_a_killed_rank_ends_the_job_with_a_failing_status(cluster, tmp_path, tiny_llama):
    out, script = _write_job(tmp_path, tiny_llama, "killed")
    job = cluster.sbatch(script, env={**_job_env(tmp_path), "DIST_FT_FAULT": "kill:3:1"}, cwd=tmp_path)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 400)
    ended = time.time()
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, _log(out))
    last_step = read_metrics(out)[0][-1]
    assert last_step["step"] == 2
    # Rank 1 died before step 3: everything is gone well within the collective timeout (polling adds ~1 s).
    assert ended - last_step["time"] < TIMEOUT_S, (ended - last_step["time"], _log(out))
    assert not (out / "final").exists()
