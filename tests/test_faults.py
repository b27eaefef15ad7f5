"""Faults during a run: a rank that stops answering ends the job within the collective timeout (no hang), and a
rank that crashes takes the job down with its error; neither leaves a final model behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from conftest import REPO, read_metrics, run_cli, tiny_recipe, write_recipe


def _recipe(tmp_path, model):
    out = tmp_path / "run"
    r = tiny_recipe(model, out, training={"max_steps": 6}, distributed={"timeout_seconds": 10})
    return out, write_recipe(tmp_path / "r.yaml", r)


def test_a_silent_rank_times_out_instead_of_hanging(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama)
    t0 = time.perf_counter()
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "hang:3:1"}, timeout=300)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    assert elapsed < 150, elapsed  # 10 s collective timeout plus start-up, far from a hang
    text = res.stdout + res.stderr
    assert "timed out" in text.lower() or "timeout" in text.lower(), text[-3000:]
    assert not (out / "final").exists()


def test_a_crashing_rank_takes_the_job_down(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "crash:2:1"}, timeout=300)
    assert res.returncode != 0 and "injected fault" in res.stdout + res.stderr
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------------- signals

def _signal_recipe(tmp_path, model, name="run", steps=8, **checkpoint):
    out = tmp_path / name
    r = tiny_recipe(model, out, method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                    training={"max_steps": steps}, distributed={"timeout_seconds": 20},
                    checkpoint={"every_steps": 0, **checkpoint})
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


def _complete_checkpoints(out):
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []


def _wait_for(predicate, timeout, what):
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _steps_logged(out):
    path = out / "metrics.jsonl"
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r] if path.is_file() else []


def _ranks(pid) -> dict[int, int]:
    """{rank: pid} of the training processes a launcher started."""
    res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    ranks = {}
    for child in map(int, res.stdout.split()):
        env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if b"=" in kv)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = child
    return ranks


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_sigterm_on_one_rank_checkpoints_on_all_and_resumes_exactly(tmp_path, tiny_llama):
    """A signal that reaches rank 1 alone, before step 4: both ranks stop after step 4 with one checkpoint, and
    the resumed run's losses and adapter equal those of a run never stopped (dropout on: the RNG comes back)."""
    ref, ref_path = _signal_recipe(tmp_path, tiny_llama, "straight")
    assert run_cli("launch", str(ref_path), "--nproc-per-node", "2").returncode == 0
    out, path = _signal_recipe(tmp_path, tiny_llama)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "signal:4:1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "stopping after step 4: SIGTERM received" in res.stdout + res.stderr
    assert _complete_checkpoints(out) == ["step-00000004"] and not (out / "final").exists()
    stopped = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stopped"' in line]
    assert stopped and stopped[-1]["reason"] == "SIGTERM" and stopped[-1]["step"] == 4
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "checkpoint.resume=auto")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    a = {r["step"]: r["loss"] for r in read_metrics(ref)[0]}
    b = {r["step"]: r["loss"] for r in read_metrics(out)[0]}
    assert sorted(b) == list(range(1, 9))
    for s in range(5, 9):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    wa = load_file(ref / "final" / "adapter_model.safetensors")
    wb = load_file(out / "final" / "adapter_model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_sigterm_to_the_launcher_reaches_every_rank(tmp_path, tiny_llama):
    """What Slurm or a user does: SIGTERM to `dist-ft launch` mid-run. The ranks agree on a step, write one
    checkpoint, and every process is gone within seconds; the launcher reports the signal in its exit status."""
    out, path = _signal_recipe(tmp_path, tiny_llama, steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(lambda: len(_steps_logged(out)) >= 2, 240, "two training steps")
        ranks = list(_ranks(proc.pid).values())
        assert len(ranks) == 2, ranks
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-3000:]
    assert "SIGTERM received; checkpoint written" in stdout + stderr, stdout[-2000:] + stderr[-3000:]
    (name,) = _complete_checkpoints(out)
    assert int(name.split("-")[1]) >= 2 and not (out / "final").exists()
    assert not any(_alive(pid) for pid in ranks)
    assert elapsed < 60, elapsed


def test_a_second_signal_exits_at_once(tmp_path, tiny_llama):
    """Rank 1 stops answering at step 3, so rank 0 sits inside a collective (C++, where no Python handler runs).
    The first SIGTERM to rank 0 is recorded and waits; the second ends it at once, leaving no partial checkpoint
    that could be mistaken for a complete one."""
    out, path = _signal_recipe(tmp_path, tiny_llama, steps=8)
    proc = subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "DIST_FT_FAULT": "hang:3:1"})
    try:
        _wait_for(lambda: len(_steps_logged(out)) >= 2, 240, "two training steps")
        time.sleep(1.0)  # rank 0 is now waiting on rank 1 in step 3's first collective
        rank0 = _ranks(proc.pid)[0]
        os.kill(rank0, signal.SIGTERM)
        time.sleep(2.0)
        assert _alive(rank0)  # the first signal only asks for a checkpoint, which this step cannot reach
        t0 = time.perf_counter()
        os.kill(rank0, signal.SIGTERM)
        _wait_for(lambda: not _alive(rank0), 10, "rank 0 to exit after the second signal")
        elapsed = time.perf_counter() - t0
        stdout, stderr = proc.communicate(timeout=120)  # torchrun then ends rank 1
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "second SIGTERM: exiting now" in stdout + stderr
    assert elapsed < 5, elapsed
    assert _complete_checkpoints(out) == [] and not (out / "final").exists()
