"""Faults, repeated: does the job end (or stop cleanly), how fast, and does the newest checkpoint resume?

    .venv/bin/python benchmarks/faults.py                  # 3 trials of each fault, 2 gloo ranks, tiny Llama
    .venv/bin/python benchmarks/faults.py --trials 10 --faults kill-during-checkpoint

Faults (DIST_FT_FAULT injects them at a chosen step; see dist_ft/faults.py):
    exception      rank 1 raises before step 3
    sigkill        rank 1 dies of SIGKILL before step 3 (what the out-of-memory killer does)
    hang           rank 1 stops answering before step 3 (distributed.timeout_seconds: 10)
    sigterm-rank   rank 1 alone gets SIGTERM before step 3: all ranks must checkpoint together and exit 0
    sigterm-launcher   SIGTERM to `dist-ft launch` after step 2 (Slurm, a user): checkpoint, exit 143
    kill-during-checkpoint   SIGKILL to every process at a random moment while checkpoints are written each step;
                   then `checkpoint.resume: auto` must continue from the newest complete one and finish
    partition      two "nodes" (network namespaces joined by a veth pair, one rank each); the link goes down
                   after step 2; both must end (needs root and `ip netns`)
    stall-checkpoint   both ranks stop making progress inside the checkpoint of step 3 (a hung filesystem: no
                   rank waits on another, so no collective times out)
    stall-final-save   rank 0 stops while writing final/ after the last step (rank 1 waits for it at a barrier)
    stall-exit     rank 1 stops on its way out, after rank 0 finished and exited 0 (torchrun waits for it)
    stall-exit-gil the same inside C code that holds the GIL (no Python thread runs again in that rank)
    slow-data      rank 1 prepares its data 25 s slower than rank 0 (timeout 10): the run must finish, rank 0 waiting
                   on the store while rank 1's heartbeat moves
    stuck-data     rank 1 stops making progress while preparing its data: the job must end, naming rank 1

"Survived" means: the expected exit status, a message naming the failing rank or the signal (for the stalls: the
phase the rank stopped in, or faulthandler's stacks), no process left behind, no final model from a failed run, and
for the checkpoint faults a resume that finishes. Time to exit is from the fault (the injected step's start, or the
signal; for the stalls the run's last record before it) to the launcher's exit.
Results: benchmarks/results/faults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FAULTS = ["exception", "sigkill", "hang", "sigterm-rank", "sigterm-launcher", "kill-during-checkpoint", "partition",
          "stall-checkpoint", "stall-final-save", "stall-exit", "stall-exit-gil", "slow-data", "stuck-data"]
INJECT = {"exception": "crash:3:1", "sigkill": "kill:3:1", "hang": "hang:3:1", "sigterm-rank": "signal:3:1",
          "stall-checkpoint": "hang-checkpoint:3", "stall-final-save": "hang-final-save:12:0",
          "stall-exit": "hang-exit:0:1", "stall-exit-gil": "hang-exit-gil:0:1", "slow-data": "slow-data:25:1",
          "stuck-data": "hang-data:0:1"}
# Where each stall is: the phase its rank's progress watchdog names (None: faulthandler's backstop ends it).
STALL_PHASE = {"stall-checkpoint": "the checkpoint of step 3", "stall-final-save": "the final save",
               "stall-exit": "the exit", "stall-exit-gil": None}


def recipe(model: Path, out: Path, **extra) -> dict:
    r = {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
         "data": {"train": "builtin:fortunes", "format": "text", "max_length": 48, "max_train_samples": 512,
                  "max_eval_samples": 8},
         "method": {"kind": "full"},
         "training": {"max_steps": 12, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0},
         "distributed": {"strategy": "ddp", "precision": "fp32", "threads_per_process": 1, "timeout_seconds": 10},
         "checkpoint": {"every_steps": 0}}
    for k, v in extra.items():
        r[k] = {**r[k], **v}
    return r


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True)
        kids = {int(p) for p in res.stdout.split()}
        out |= kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def steps_logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def complete_checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "manifest.json").is_file()) \
        if root.is_dir() else []


def launch(path: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def watch(proc: subprocess.Popen, out: Path, until_step: int, timeout: float = 300) -> tuple[set[int], float]:
    """Wait for `until_step` to start (its predecessor logged); return every process seen and that moment."""
    seen, t0 = set(), time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t0 < timeout:
        seen |= descendants(proc.pid)
        if len(steps_logged(out)) >= until_step - 1:
            return seen, time.perf_counter()
        time.sleep(0.05)
    return seen, time.perf_counter()


def partition_trial(model: Path, work: Path) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, training={"max_steps": 100000})))
    a, b, va, vb = "dfbench_a", "dfbench_b", "dfbench_va", "dfbench_vb"
    for cmd in (f"ip netns del {a}", f"ip netns del {b}"):
        subprocess.run(cmd.split(), capture_output=True)
    for cmd in (f"ip netns add {a}", f"ip netns add {b}", f"ip link add {va} type veth peer name {vb}",
                f"ip link set {va} netns {a}", f"ip link set {vb} netns {b}",
                f"ip -n {a} addr add 10.78.0.1/24 dev {va}", f"ip -n {b} addr add 10.78.0.2/24 dev {vb}",
                f"ip -n {a} link set lo up", f"ip -n {b} link set lo up", f"ip -n {a} link set {va} up",
                f"ip -n {b} link set {vb} up"):
        subprocess.run(cmd.split(), check=True, capture_output=True)
    try:
        nodes = [subprocess.Popen(["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}", sys.executable,
                                   "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "1", "--nnodes", "2",
                                   "--node-rank", str(i), "--rdzv-endpoint", "10.78.0.1:29544"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                  start_new_session=True)
                 for i, (ns, ifname) in enumerate(((a, va), (b, vb)))]
        seen = set()
        t0 = time.perf_counter()
        while len(steps_logged(out)) < 2 and time.perf_counter() - t0 < 300 and all(n.poll() is None for n in nodes):
            time.sleep(0.1)
        for n in nodes:
            seen |= descendants(n.pid) | {n.pid}
        subprocess.run(["ip", "-n", a, "link", "set", va, "down"], check=True)
        t_fault = time.perf_counter()
        for n in nodes:
            try:
                n.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                os.killpg(n.pid, signal.SIGKILL)
                n.communicate()
        t_exit = time.perf_counter()
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    time.sleep(0.5)
    left = sorted(p for p in seen if alive(p))
    ok = all(n.returncode != 0 for n in nodes) and not left and not (out / "final").exists()
    return {"fault": "partition", "ok": ok, "rc": [n.returncode for n in nodes],
            "seconds_to_exit": round(t_exit - t_fault, 2), "left_behind": left,
            "note": "both nodes ended (timeout_seconds 10)"}


def run_out(proc: subprocess.Popen) -> tuple[str, set[int]]:
    """Wait for a launch to end, noting every process it started; (its output, those pids)."""
    seen = set()
    try:
        while proc.poll() is None:
            seen |= descendants(proc.pid)
            time.sleep(0.1)
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
    return text, seen


def stall_trial(kind: str, model: Path, work: Path) -> dict:
    """A rank stops making progress where no peer waits on it in a collective: the job must still end, within
    distributed.timeout_seconds (10) plus a bounded margin, naming where."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, checkpoint={"every_steps": 3})))
    proc = launch(path, {"DIST_FT_FAULT": INJECT[kind]})
    text, seen = run_out(proc)
    ended = time.time()
    time.sleep(0.5)
    left = sorted(p for p in seen if alive(p))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    where = STALL_PHASE[kind]
    named = f"no progress in {where} for 10 s" in text if where else "Timeout (0:00:20)!" in text
    if kind == "stall-final-save":  # rank 1's collective timeout and rank 0's watchdog race: either names it
        named = named or "timed out" in text.lower()
    final_ok = (out / "final").is_dir() == kind.startswith("stall-exit")
    ok = proc.returncode != 0 and named and final_ok and not left
    return {"fault": kind, "ok": ok, "rc": proc.returncode, "seconds_to_exit": round(ended - records[-1]["time"], 2),
            "left_behind": left, "note": ("phase named" if where else "faulthandler's stacks") if named else
            "NOT named"}


def data_trial(kind: str, model: Path, work: Path) -> dict:
    """A rank slow (or stuck) preparing its data, before the process group starts. Time to exit: from the launch
    (the fault is at the start), so for slow-data it is the whole run, 25 s of it rank 1's delay."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, training={"max_steps": 4})))
    t0 = time.perf_counter()
    proc = launch(path, {"DIST_FT_FAULT": INJECT[kind]})
    text, seen = run_out(proc)
    elapsed = time.perf_counter() - t0
    time.sleep(0.5)
    left = sorted(p for p in seen if alive(p))
    if kind == "slow-data":
        ok = proc.returncode == 0 and "waiting for rank(s) [1]" in text and (out / "final").is_dir()
        note = "finished; rank 0 waited for rank 1" if ok else "did NOT finish"
    else:
        named = "rank 1 sent no heartbeat" in text
        ok = proc.returncode != 0 and named and not (out / "final").exists()
        note = "stuck rank named" if named else "stuck rank NOT named"
    return {"fault": kind, "ok": ok and not left, "rc": proc.returncode, "seconds_to_exit": round(elapsed, 2),
            "left_behind": left, "note": note}


def trial(kind: str, model: Path, work: Path, rng: random.Random) -> dict:
    if kind in ("slow-data", "stuck-data"):
        return data_trial(kind, model, work)
    if kind == "partition":
        return partition_trial(model, work)
    if kind.startswith("stall-"):
        return stall_trial(kind, model, work)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    extra = {"checkpoint": {"every_steps": 1}, "training": {"max_steps": 200}} \
        if kind == "kill-during-checkpoint" else {}
    if kind == "sigterm-launcher":
        extra = {"training": {"max_steps": 200}}
    path = work / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, **extra)))
    proc = launch(path, {"DIST_FT_FAULT": INJECT[kind]} if kind in INJECT else None)
    seen, t_fault = watch(proc, out, until_step=3)
    note = ""
    if kind == "sigterm-launcher":
        proc.send_signal(signal.SIGTERM)
        t_fault = time.perf_counter()
    elif kind == "kill-during-checkpoint":
        time.sleep(rng.uniform(0.0, 3.0))
        seen |= descendants(proc.pid)
        for pid in [*seen, proc.pid]:  # the whole node at once, ranks first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t_fault = time.perf_counter()
    try:
        text, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
    t_exit = time.perf_counter()
    time.sleep(0.5)
    left = sorted(p for p in seen if alive(p))
    rc = proc.returncode
    if kind in ("exception", "sigkill", "hang"):
        named = "rank: 1" in text or "rank 1" in text
        ok = rc != 0 and named and not (out / "final").exists()
        note = "failing rank named" if named else "failing rank NOT named"
    elif kind in ("sigterm-rank", "sigterm-launcher"):
        expected = 0 if kind == "sigterm-rank" else 128 + signal.SIGTERM
        ckpts = complete_checkpoints(out)
        ok = rc == expected and "SIGTERM received; checkpoint written" in text and len(ckpts) == 1
        note = f"checkpoint at step {ckpts[0]}" if ckpts else "no checkpoint"
    else:
        ckpts = complete_checkpoints(out)
        partial = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*")) if (out / "checkpoints").is_dir() else []
        res = subprocess.run([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2",
                              "checkpoint.resume=auto", f"training.max_steps={(ckpts[-1] if ckpts else 0) + 2}"],
                             capture_output=True, text=True, cwd=REPO, timeout=600)
        resumed = bool(ckpts) and f"step-{ckpts[-1]:08d}" in res.stdout + res.stderr and res.returncode == 0
        ok = resumed or (not ckpts and res.returncode != 0)  # nothing to resume from must fail loudly
        note = (f"killed {'mid-write' if partial else 'between writes'}; newest complete step "
                f"{ckpts[-1] if ckpts else None}; resume {'ok' if resumed else 'FAILED'}")
    ok = ok and not left
    return {"fault": kind, "ok": ok, "rc": rc, "seconds_to_exit": round(t_exit - t_fault, 2),
            "left_behind": left, "note": note}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from dist_ft.testing import make_model

    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist_ft_faults_") as tmp:
        work = Path(tmp)
        model = make_model(work / "tiny-llama", arch="llama")
        for kind in args.faults.split(","):
            for i in range(args.trials):
                r = trial(kind, model, work, rng)
                rows.append(r)
                print(f"[faults] {kind} #{i + 1}: {'survived' if r['ok'] else 'FAILED'}, exit {r['rc']} after "
                      f"{r['seconds_to_exit']} s; {r['note']}" + (f"; left behind {r['left_behind']}"
                                                                  if r["left_behind"] else ""), flush=True)
    # A run of some faults replaces their rows only: the table keeps every fault's latest trials.
    ran = args.faults.split(",")
    old = json.loads((RESULTS / "faults.json").read_text()) if (RESULTS / "faults.json").is_file() else []
    rows = [r for r in old if r["fault"] not in ran] + rows
    lines = ["| fault | trials | survived | time to exit (s), median [max] | notes |", "|---|---:|---:|---|---|"]
    for kind in [k for k in FAULTS if any(r["fault"] == k for r in rows)]:
        rs = [r for r in rows if r["fault"] == kind]
        ts = sorted(r["seconds_to_exit"] for r in rs)
        notes = "; ".join(sorted({r["note"] for r in rs}))
        lines.append(f"| {kind} | {len(rs)} | {sum(r['ok'] for r in rs)} | {ts[len(ts) // 2]} [{ts[-1]}] | {notes} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "faults.md").write_text("# Faults, repeated (2 gloo ranks, tiny Llama, CPU)\n\n"
                                       "`.venv/bin/python benchmarks/faults.py`\n\n" + table + "\n")
    return 0 if all(r["ok"] for r in rows if r["fault"] in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
