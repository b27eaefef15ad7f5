"""Resume, repeated until it hangs (or does not): the stress harness for intermittent hangs (issue 22).

    .venv/bin/python benchmarks/stress_resume.py --reps 50                    # ddp-lora, as tests/test_checkpoints.py
    .venv/bin/python benchmarks/stress_resume.py --reps 20 --hog 2 --cases ddp-lora,ddp-full
    .venv/bin/python benchmarks/stress_resume.py --reps 5 --fresh              # also the stopped first half, each time

Each repetition is the second half of `test_exact_resume`: a 2-rank `dist-ft launch` with checkpoint.resume: auto
from the checkpoint of step 6 (written once per case by a run with training.stop_after_steps: 6, then copied), the
steps 7 to 12, the checkpoint of step 12, the final evaluation and save, the process group's shutdown and exit.
`--fresh` runs the first half again every time as well. `--hog N` keeps N busy-looping processes running during
every other repetition (CPU contention: the ranks get a fraction of a core at random moments).

A run that has not ended after `--hang-after` seconds is a hang: the stack of every process of the job (py-spy, when
installed) is written beside the results before it is killed. A run that ended but not with status 0 and a
complete `final/` is a failure. Results: benchmarks/results/stress-resume.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(REPO / "tests"))
from conftest import tiny_recipe  # noqa: E402  the tests' recipe, so that this stays the case they run

METHODS = {"full": {"kind": "full"}, "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}}


def recipe(model: Path, out: Path, strategy: str, method: str, timeout: int) -> dict:
    """tests/test_checkpoints.py's `_recipe` (12 steps, a checkpoint every 6)."""
    return tiny_recipe(model, out, method=METHODS[method],
                       training={"max_steps": 12, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                                 "learning_rate": 2e-3},
                       distributed={"strategy": strategy, "timeout_seconds": timeout},
                       checkpoint={"every_steps": 6, "keep_last": None})


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True)
        kids = [int(p) for p in res.stdout.split()]
        out += kids
        todo += kids
    return out


def dump_stacks(pids: list[int], where: Path) -> list[str]:
    """py-spy's stack of every process (Python and native frames), one file each; the files written."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    written = []
    for pid in pids:
        path = where / f"pid-{pid}.txt"
        try:
            res = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                                 timeout=60)
            text = res.stdout + res.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"py-spy failed: {exc}"
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() + "\n" + text
        except OSError:
            pass
        path.write_text(text)
        written.append(str(path))
    return written


def run_job(args: list[str], *, hang_after: float, log: Path, stacks: Path, no_stdin: bool = False) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        # CI runs with no standard input: file descriptor 0 closed, so the first file or socket a process opens
        # takes it.
        proc = subprocess.Popen([sys.executable, "-m", "dist_ft", *args], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=(lambda: os.close(0)) if no_stdin else None)
        try:
            rc = proc.wait(timeout=hang_after)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            stacks.mkdir(parents=True, exist_ok=True)
            dump_stacks([proc.pid, *descendants(proc.pid)], stacks)
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    return {"rc": rc, "hung": hung, "seconds": round(time.perf_counter() - t0, 1)}


def last_step(out: Path) -> int | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]
    return steps[-1] if steps else None


def start_hog(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=50, help="repetitions of each case")
    p.add_argument("--cases", default="ddp-lora", help="STRATEGY-METHOD,... (method: full or lora)")
    p.add_argument("--hog", type=int, default=0, help="busy-looping processes during every other repetition")
    p.add_argument("--fresh", action="store_true", help="run the stopped first half again every repetition")
    p.add_argument("--timeout", type=int, default=300, help="distributed.timeout_seconds (the tests' default)")
    p.add_argument("--hang-after", type=float, default=240, help="seconds after which a run counts as hung")
    p.add_argument("--no-stdin", action="store_true", help="start the jobs with standard input closed, as CI does")
    p.add_argument("--out", type=Path, default=RESULTS / "stress-resume")
    args = p.parse_args()
    from dist_ft.testing import make_model

    rows = []
    keep = args.out.parent / (args.out.name + "-hangs")
    with tempfile.TemporaryDirectory(prefix="dist_ft_stress_") as tmp:
        work = Path(tmp)
        model = make_model(work / "tiny-llama", arch="llama")
        for case in args.cases.split(","):
            strategy, method = case.split("-")
            template = work / f"{case}-half"
            path = work / f"{case}.yaml"
            path.write_text(yaml.safe_dump(recipe(model, template, strategy, method, args.timeout)))
            first = run_job(["launch", str(path), "--nproc-per-node", "2", "training.stop_after_steps=6"],
                            hang_after=args.hang_after, log=work / f"{case}-half.log", stacks=keep / f"{case}-half",
                            no_stdin=args.no_stdin)
            if first["rc"] != 0:
                print((work / f"{case}-half.log").read_text()[-3000:])
                raise SystemExit(f"{case}: the first half failed ({first})")
            for i in range(args.reps):
                hog = start_hog(args.hog) if args.hog and i % 2 == 1 else []
                try:
                    out = work / f"{case}-{i}"
                    rpath = work / f"{case}-{i}.yaml"
                    rpath.write_text(yaml.safe_dump(recipe(model, out, strategy, method, args.timeout)))
                    half = None
                    if args.fresh:
                        half = run_job(["launch", str(rpath), "--nproc-per-node", "2", "training.stop_after_steps=6"],
                                       hang_after=args.hang_after, log=work / f"{case}-{i}-half.log",
                                       stacks=keep / f"{case}-{i}-half", no_stdin=args.no_stdin)
                    else:
                        shutil.copytree(template, out)
                    log = work / f"{case}-{i}.log"
                    r = run_job(["launch", str(rpath), "--nproc-per-node", "2", "checkpoint.resume=auto"],
                                hang_after=args.hang_after, log=log, stacks=keep / f"{case}-{i}",
                                no_stdin=args.no_stdin)
                finally:
                    for h in hog:
                        h.kill()
                        h.wait()
                text = log.read_text(errors="replace")
                ok = r["rc"] == 0 and not r["hung"] and (out / "final" / "adapter_config.json" if method == "lora"
                                                         else out / "final" / "config.json").is_file()
                row = {"case": case, "rep": i, "hog": len(hog), **r, "ok": ok, "last_step": last_step(out),
                       "first_half": half, "watchdog": "no progress for" in text}
                if not ok:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, keep / f"{case}-{i}.log")
                    row["log_tail"] = text[-2000:]
                rows.append(row)
                verdict = "ok" if ok else "HUNG" if r["hung"] else "FAILED"
                print(f"[stress] {case} #{i + 1}{' (hog)' if hog else ''}: {verdict} rc {r['rc']} in {r['seconds']} s, "
                      f"last step {row['last_step']}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    lines = ["| case | CPU hog | runs | ok | hung | failed | seconds, median [max] |",
             "|---|---|---:|---:|---:|---:|---|"]
    for case in args.cases.split(","):
        for hogged in (False, True):
            rs = [r for r in rows if r["case"] == case and bool(r["hog"]) == hogged]
            if not rs:
                continue
            ts = sorted(r["seconds"] for r in rs)
            lines.append(f"| {case} | {f'{args.hog} busy loops' if hogged else 'none'} | {len(rs)} | "
                         f"{sum(r['ok'] for r in rs)} | {sum(r['hung'] for r in rs)} | "
                         f"{sum(not r['ok'] and not r['hung'] for r in rs)} | {ts[len(ts) // 2]} [{ts[-1]}] |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    cmd = "`.venv/bin/python benchmarks/stress_resume.py " + " ".join(sys.argv[1:]) + "`"
    args.out.with_suffix(".md").write_text(
        "# Resume, repeated (2 gloo ranks, tiny Llama, CPU): the second half of test_exact_resume\n\n"
        f"{cmd}\n\nA run is hung when it has not ended after {args.hang_after:.0f} s "
        f"(distributed.timeout_seconds {args.timeout}); standard input "
        f"{'closed, as in CI' if args.no_stdin else 'inherited'}.\n\n" + table + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
