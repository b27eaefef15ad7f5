"""Faults during a run, each on 2 real gloo ranks.

- A rank that stops answering ends the job within the collective timeout (no hang), also where no peer waits for
  it in a collective (checkpoint I/O on every rank, the final save, the exit after its peer finished, a stall that
  holds the GIL): its progress watchdog ends it; a rank that crashes takes the job down with its error; none
  leaves a final model behind unless the stall came after it was complete.
- Stop signals (SIGTERM to one rank, or to the launcher) give one agreed checkpoint and a clean exit, and the
  resume is exact; a second signal ends a rank at once, even inside a collective.
- A full disk while saving: a clear error on every rank, nothing complete lost, no partial checkpoint left.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_ft import checkpoint as ckpt
from dist_ft.signals import EXIT_STOPPED

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


# Where a rank can stall with no peer waiting for it in a collective (whose timeout would end the job): the
# phase the rank's progress watchdog names (None: the stall holds the GIL, so faulthandler's backstop ends it).
STALLS = {"hang-checkpoint:3": "the checkpoint of step 3",  # every rank at once, as on a hung filesystem
          "hang-final-save:6:0": "the final save",  # rank 0 writing final/ (rank 1 waits at the barrier, and times out)
          "hang-exit:0:1": "the exit",  # rank 1 on its way out, after rank 0 finished and exited 0
          "hang-exit-gil:0:1": None}  # the same inside C code that keeps the GIL (a destructor joining a thread)


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.slow) if f in ("hang-exit:0:1", "hang-final-save:6:0")
                                   else f for f in STALLS])  # CI time: hang-exit-gil covers the exit, hang-checkpoint a save
def test_a_stall_anywhere_ends_the_job_within_the_timeout(tmp_path, tiny_llama, fault):
    """A rank that stops making progress where nobody waits on it in a collective still ends the job within
    distributed.timeout_seconds (10) plus a bounded margin, saying where it was; before the progress watchdog, the
    agent waited for such a rank forever (its peers had exited 0, or were stuck too)."""
    out, path = _recipe(tmp_path, tiny_llama)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "checkpoint.every_steps=3",
                  env={"DIST_FT_FAULT": fault}, timeout=300)
    ended = time.time()
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["time"]
    # From the last record before the stall: the timeout (10), faulthandler's backstop (10) when the GIL is held,
    # the agent's reaction and the ranks' exit; the stalled rank would otherwise never end.
    assert ended - last < 10 + (10 if STALLS[fault] is None else 0) + 45, (ended - last, text[-3000:])
    where = STALLS[fault]
    if where is None:
        assert "Timeout (0:00:20)!" in text and "in inject" in text, text[-3000:]  # faulthandler's stacks
    elif fault.startswith("hang-final-save"):  # rank 1's collective timeout and rank 0's watchdog race
        assert f"no progress in {where} for 10 s" in text or "timed out" in text.lower(), text[-3000:]
    else:
        assert f"no progress in {where} for 10 s (distributed.timeout_seconds)" in text, text[-3000:]
        assert "(exit status 124)" in text and "Where each thread was" in text
    if fault.startswith("hang-exit"):
        assert (out / "final").is_dir()  # it stalled after the run's outputs were complete
    else:
        assert not (out / "final").exists()
    if fault.startswith("hang-checkpoint"):
        assert _complete_checkpoints(out) == [] and (out / "checkpoints" / ".tmp-step-00000003").is_dir()


@pytest.mark.parametrize("fault", ["crash", "kill"])
def test_a_dying_rank_takes_the_job_down(tmp_path, tiny_llama, fault):
    """An exception on rank 1 only, or SIGKILL (what the out-of-memory killer sends): the job ends with a
    non-zero status, the failing rank is named, and no process is left behind."""
    out, path = _recipe(tmp_path, tiny_llama)
    proc = subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "DIST_FT_FAULT": f"{fault}:2:1"})
    ranks = {}
    while proc.poll() is None and len(ranks) < 2:
        ranks = _ranks(proc.pid)
        time.sleep(0.05)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    text = stdout + stderr
    assert proc.returncode != 0
    assert "rank      : 1" in text or "rank: 1" in text, text[-3000:]  # torchrun's failure table names it
    if fault == "crash":
        assert "injected fault" in text
    else:
        assert "Signal 9 (SIGKILL)" in text, text[-3000:]
    time.sleep(0.5)
    assert not any(_alive(pid) for pid in ranks.values())
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
    assert res.returncode == EXIT_STOPPED, res.stdout[-2000:] + res.stderr[-3000:]  # "to be continued"
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


@pytest.mark.parametrize("to", ["launcher", "process-group"])
def test_a_stop_signal_to_the_launcher_reaches_every_rank(tmp_path, tiny_llama, to):
    """What Slurm or a user does: SIGTERM to `dist-ft launch` mid-run, or Ctrl-C / Slurm's step signal, which reach
    every process at once (each rank then hears it twice: directly and forwarded by the agent, and must count it
    once). The ranks agree on a step, write one checkpoint, and every process is gone within seconds; the
    launcher's exit status says "stopped, to be continued" (75), not "killed by a signal"."""
    out, path = _signal_recipe(tmp_path, tiny_llama, steps=400)
    proc = subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    sig = signal.SIGTERM if to == "launcher" else signal.SIGINT
    try:
        _wait_for(lambda: len(_steps_logged(out)) >= 2, 240, "two training steps")
        ranks = list(_ranks(proc.pid).values())
        assert len(ranks) == 2, ranks
        t0 = time.perf_counter()
        proc.send_signal(sig) if to == "launcher" else os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
        elapsed = time.perf_counter() - t0
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, stdout[-2000:] + stderr[-3000:]
    assert f"{sig.name} received; checkpoint written" in stdout + stderr, stdout[-2000:] + stderr[-3000:]
    assert "exiting now, without a checkpoint" not in stdout + stderr
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


# ------------------------------------------------------------------------------------------- disk full
# (small_disk: a tmpfs of a chosen size, tests/conftest.py)

def _disk_recipe(tmp_path, model, out, strategy="ddp"):
    r = tiny_recipe(model, out, training={"max_steps": 6}, distributed={"strategy": strategy, "timeout_seconds": 60},
                    checkpoint={"every_steps": 2, "keep_last": None}, data={"max_eval_samples": 4})
    return write_recipe(tmp_path / f"{out.parent.name}-{out.name}.yaml", r)


def _checkpoint_kib(tmp_path, model) -> int:
    out = tmp_path / "sizing"
    path = _disk_recipe(tmp_path, model, out)
    assert run_cli("train", str(path), "training.max_steps=2").returncode == 0
    return sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file()) // 1024


def test_disk_full_while_saving(tmp_path, tiny_llama, small_disk):
    """Two ways to run out of space, on 2 ranks: the first checkpoint does not fit at all (the write fails on
    disk), or a later one would not fit (refused before writing). Either way a clear error names the problem and
    the fix, every rank stops (no collective timeout), and what was already written stays complete."""
    kib = _checkpoint_kib(tmp_path, tiny_llama)
    # (a) Room for the run's small files but not for one checkpoint: the write itself fails with ENOSPC.
    disk = small_disk("tiny", kib // 3)
    out = disk / "run"
    t0 = time.perf_counter()
    res = run_cli("launch", str(_disk_recipe(tmp_path, tiny_llama, out)), "--nproc-per-node", "2")
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "writing the checkpoint of step 2 failed" in text and "MiB free under" in text, text[-3000:]
    assert "no earlier checkpoint exists" in text
    assert time.perf_counter() - t0 < 120  # both ranks stopped together, well inside the 60 s collective timeout
    assert not list((out / "checkpoints").glob(".tmp-*")) and not list((out / "checkpoints").glob("step-*"))
    # (b) Room for one checkpoint and a half: step 2 is written, step 4 is refused before a byte is written.
    disk = small_disk("half", int(kib * 1.6) + 256)
    out = disk / "run"
    res = run_cli("launch", str(_disk_recipe(tmp_path, tiny_llama, out)), "--nproc-per-node", "2")
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "would not fit" in text and "step-00000002, is intact" in text, text[-3000:]
    assert _complete_checkpoints(out) == ["step-00000002"] and not list((out / "checkpoints").glob(".tmp-*"))
    kept = out / "checkpoints" / "step-00000002"
    assert ckpt.checksum_problems(kept, ckpt.read_manifest(kept)) == []  # every byte as its manifest says


# ------------------------------------------------------------------------------------------- network partition

@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: two "nodes" with their own addresses (needs root)."""
    tag = f"{os.getpid() % 10000}"
    a, b, va, vb = f"dfa{tag}", f"dfb{tag}", f"va{tag}", f"vb{tag}"
    setup = [f"ip netns add {a}", f"ip netns add {b}", f"ip link add {va} type veth peer name {vb}",
             f"ip link set {va} netns {a}", f"ip link set {vb} netns {b}",
             f"ip -n {a} addr add 10.77.0.1/24 dev {va}", f"ip -n {b} addr add 10.77.0.2/24 dev {vb}",
             f"ip -n {a} link set lo up", f"ip -n {b} link set lo up",
             f"ip -n {a} link set {va} up", f"ip -n {b} link set {vb} up"]
    try:
        for cmd in setup:
            res = subprocess.run(cmd.split(), capture_output=True, text=True)
            if res.returncode != 0:
                pytest.skip(f"cannot build two network namespaces here ({cmd}: {res.stderr.strip()})")
        yield {"ns": (a, b), "ifname": (va, vb), "addr": ("10.77.0.1", "10.77.0.2")}
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_network_partition_ends_the_job(tmp_path, tiny_llama, two_hosts):
    """Two nodes of one rank each, over a veth link; the link goes down mid-run. Both nodes must end (non-zero)
    within the collective timeout, not hang, and leave nothing running."""
    out = tmp_path / "run"
    r = tiny_recipe(tiny_llama, out, training={"max_steps": 400}, distributed={"timeout_seconds": 15})
    path = write_recipe(tmp_path / "r.yaml", r)
    (ns_a, ns_b), (if_a, if_b) = two_hosts["ns"], two_hosts["ifname"]
    nodes = []
    for rank, (ns, ifname) in enumerate(((ns_a, if_a), (ns_b, if_b))):
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}", "PYTHONUNBUFFERED=1",
               sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "1", "--nnodes", "2",
               "--node-rank", str(rank), "--rdzv-endpoint", f"{two_hosts['addr'][0]}:29533"]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                      start_new_session=True))
    seen: set[int] = set()
    try:
        t_start = time.perf_counter()
        while len(_steps_logged(out)) < 2:
            assert all(n.poll() is None for n in nodes), [n.communicate()[0][-2000:] for n in nodes]
            assert time.perf_counter() - t_start < 240, "the two nodes never trained"
            time.sleep(0.1)
        for n in nodes:
            seen |= set(_ranks(n.pid).values()) | {n.pid}
        subprocess.run(["ip", "-n", ns_a, "link", "set", if_a, "down"], check=True)
        t0 = time.perf_counter()
        texts = [n.communicate(timeout=300)[0] for n in nodes]
        elapsed = time.perf_counter() - t0
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    assert all(n.returncode != 0 for n in nodes), [t[-2000:] for t in texts]
    print(f"\n[partition] both nodes ended {elapsed:.1f} s after the link went down (timeout 15 s)")
    assert elapsed < 15 + 60, elapsed
    time.sleep(0.5)
    assert not any(_alive(p) for p in seen)
    assert not (out / "final").exists()


@pytest.mark.parametrize("gap, exits", [(0.1, False), (1.5, True)])
def test_a_signal_heard_twice_at_once_counts_once(gap, exits):
    """A signal to a whole process group or Slurm step reaches a rank directly and again through its launcher,
    a few milliseconds apart: that is one request. The same signal a second later is the user insisting."""
    code = (
        "import os, signal, time\n"
        "from dist_ft.signals import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        f"    time.sleep({gap})\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.5)\n"
        "    print('still here', stop.signum)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    if exits:
        assert res.returncode == 128 + signal.SIGTERM and "second SIGTERM" in res.stderr, res
    else:
        assert res.returncode == 0 and "still here 15" in res.stdout, res


@pytest.mark.parametrize("how, code", [("progress", 0), ("stall", 124), ("stall-gil", 1), ("unwatched", 0)])
def test_the_progress_watchdog(how, code):
    """Beats keep a rank alive past the limit; a stall ends it with the phase and the stacks (124); a stall in C
    code that keeps the GIL is ended by faulthandler's backstop (1); after `unwatch` nothing fires."""
    script = (
        "import ctypes, time\n"
        "from dist_ft.distributed import watchdog\n"
        "watchdog.watch(2, rank=1)\n"
        "watchdog.phase('the test phase')\n"
        "for _ in range(8):\n"
        "    time.sleep(0.5)\n"
        "    watchdog.beat()\n"
        f"how = {how!r}\n"
        "if how == 'unwatched':\n"
        "    watchdog.unwatch()\n"
        "if how in ('stall', 'unwatched'):\n"
        "    time.sleep(6)\n"
        "if how == 'stall-gil':\n"
        "    ctypes.PyDLL(None).sleep(30)\n"
        "print('done')\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.perf_counter() - t0
    assert res.returncode == code, res
    if how == "stall":
        assert "rank 1: no progress in the test phase for 2 s" in res.stderr and 'line 12 in <module>' in res.stderr
        assert elapsed < 4 + 2 + 2 + 3, elapsed
    elif how == "stall-gil":
        assert "Timeout (0:00:04)!" in res.stderr and "line 14 in <module>" in res.stderr, res.stderr
        assert elapsed < 4 + 4 + 2 + 3, elapsed
    else:
        assert "done" in res.stdout and "no progress" not in res.stderr


@pytest.mark.parametrize("streaming", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["tokenize-before-start", "streaming"])
def test_a_slow_tokenizer_on_one_rank_does_not_time_out_a_collective(tmp_path, tiny_llama, streaming):
    """Rank 1 prepares its data 25 s slower than rank 0, with distributed.timeout_seconds 10: before the process
    group starts (the tokenization every run does), or at its first streamed rows (a stream tokenizes as it reads,
    after the group started). Rank 0 waits on the launcher's store while rank 1's heartbeat moves, and says so;
    the run ends normally. Before this wait, rank 0's process-group start (or its first all-reduce) timed out."""
    out = tmp_path / "run"
    data = {}
    if streaming:
        from test_data_scale import _shards

        folder, _, evals = _shards(tmp_path)
        data = {"train": str(folder), "eval": str(evals), "format": "text", "streaming": True,
                "max_train_samples": None, "max_eval_samples": None}
    r = tiny_recipe(tiny_llama, out, training={"max_steps": 3}, distributed={"timeout_seconds": 10},
                    **({"data": data} if data else {}))
    path = write_recipe(tmp_path / "r.yaml", r)
    t0 = time.perf_counter()
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "slow-data:25:1"}, timeout=400)
    elapsed = time.perf_counter() - t0
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert elapsed > 25  # rank 1 really was slow
    assert "waiting for rank(s) [1]" in text and "they are alive" in text, text[-4000:]
    assert (out / "final").is_dir()
    assert [m["step"] for m in read_metrics(out)[0]] == [1, 2, 3]


def test_a_peer_that_stops_sending_heartbeats_is_named():
    """Rank 0 waits for rank 1, whose heartbeat moved once and then stopped (a dead or stopped process): the wait
    ends after stall_seconds with an error naming rank 1, on a real TCPStore."""
    import datetime

    import torch.distributed as dist

    from dist_ft.distributed.rendezvous import PatientWait, PeerStalled
    from dist_ft.distributed.topology import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=datetime.timedelta(seconds=30))
    store.add("dist_ft/patient/data preparation/beat/1", 1)  # rank 1 began, then went silent
    waits = PatientWait(store, 0, 2, stall_seconds=2.0, log=lambda m: None, beat_seconds=0.2)
    t0 = time.perf_counter()
    with pytest.raises(PeerStalled, match="rank 1 sent no heartbeat"):
        waits.patient("data preparation", lambda: None)
    assert 2.0 <= time.perf_counter() - t0 < 10


def test_a_rank_stuck_preparing_its_data_is_named_within_the_timeout(tmp_path, tiny_llama):
    """Rank 1 stops making progress while it prepares its data (alive, but stuck, as on a hung filesystem): its
    heartbeat stops moving, so rank 0 stops waiting after distributed.timeout_seconds (10), names rank 1, and the
    job ends instead of waiting forever."""
    out, path = _recipe(tmp_path, tiny_llama)
    t0 = time.perf_counter()
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "hang-data:0:1"}, timeout=300)
    elapsed = time.perf_counter() - t0
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert "rank 1 sent no heartbeat" in text, text[-3000:]
    assert elapsed < 10 + 60, elapsed
    assert not (out / "final").exists()
