"""Command line: `dist-ft {check,train,launch,slurm,plan,data,sweep,export,report,demo}`.

    dist-ft check RECIPE.yaml [section.key=value ...]     validate; print the resolved recipe; exit 2 on errors
                  [--accelerate-config FILE]              (and an accelerate config file against the recipe)
    dist-ft train RECIPE.yaml [overrides]                 train here (one process, or one rank of a launcher)
    dist-ft launch RECIPE.yaml --nproc-per-node N [...]   start the ranks (torchrun's machinery) and train
    dist-ft slurm RECIPE.yaml --nodes N --gpus-per-node G  write (--submit: and submit) a Slurm batch script
    dist-ft plan RECIPE.yaml --nodes N --gpus-per-node G  memory per rank, verdict, speed, for any model and cluster
    dist-ft doctor RECIPE.yaml [--nproc-per-node N ...]   check the allocation before a long job (dist_ft/doctor/)
    dist-ft data RECIPE.yaml                              the data report: sizes, lengths, labels, duplicates
    dist-ft sweep RECIPE.yaml SWEEP.yaml [--trials N]      hyperparameter search, each trial a real run
    dist-ft export SOURCE OUT [--merge-lora] [--dtype D]  a Hugging Face folder from a checkpoint or a run
    dist-ft export SOURCE OUT.gguf --format gguf [--quant Q]  one GGUF file for llama.cpp / Ollama
    dist-ft report RUN_DIR                                report.md and PNG plots from metrics.jsonl
    dist-ft demo [--nproc-per-node N] [--output-dir D]    the embedded real fine-tune (SmolLM2 on WordNet)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import RecipeError, describe_schema, dump_recipe, load_recipe
from .data.sources import DataError
from .launch import launch


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_check(args) -> int:
    from .preflight import preflight

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        problems = []
        try:
            preflight(recipe, source=args.recipe, check_output=not args.ignore_output_dir)
        except RecipeError as exc:
            problems += exc.problems
        if args.accelerate_config is not None:
            problems += _accelerate_config_problems(recipe, args.accelerate_config)
        if problems:
            raise RecipeError(problems, args.recipe)
    except RecipeError as exc:
        return _fail(exc)
    print(dump_recipe(recipe), end="")
    print(f"# ok: {args.recipe} is valid", file=sys.stderr)
    return 0


def _accelerate_config_problems(recipe, config_file: str) -> list[str]:
    """What `accelerate launch --config_file FILE -m dist_ft train` would be refused for, before launching it."""
    from .distributed.accelerate_config import accelerate_launch_env
    from .distributed.launchers import launcher_problems

    try:
        env = accelerate_launch_env(config_file)
    except ValueError as exc:
        return [f"--accelerate-config: {exc}"]
    return launcher_problems(recipe, env)


def cmd_schema(args) -> int:
    for key, tp, default, help_ in describe_schema():
        print(f"{key:42} {tp:40} default {default!r}\n{'':42} {help_}")
    return 0


def cmd_train(args) -> int:
    from .checkpoint.store import CheckpointError
    from .signals import EXIT_STOPPED
    from .train.run import run_training

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        result = run_training(recipe, source=args.recipe)
    except (RecipeError, DataError, CheckpointError) as exc:
        return _fail(exc)
    if result.stopped_at is not None:
        # A planned stop (training.stop_after_steps) succeeded; a signal's stop is to be continued: say so.
        return 0 if result.stop_reason == "training.stop_after_steps" else EXIT_STOPPED
    if result.eval_after and os.environ.get("RANK", "0") == "0":
        print(f"[dist_ft] done: {result.steps} steps in {result.seconds:.1f} s; eval_loss "
              f"{result.eval_before.get('eval_loss', float('nan')):.4f} -> {result.eval_after['eval_loss']:.4f}",
              flush=True)
    return 0


def cmd_launch(args) -> int:
    from .preflight import preflight

    try:  # validate once here, before starting any process
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe, source=args.recipe, world_size=args.nproc_per_node * args.nnodes)
    except RecipeError as exc:
        return _fail(exc)
    return launch(args.recipe, args.overrides, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                  node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, local_addr=args.local_addr,
                  # A checkpoint is bounded by the collective timeout anyway (ranks wait on each other in it).
                  shutdown_timeout=recipe.distributed.timeout_seconds + 30,
                  read_timeout=recipe.distributed.timeout_seconds, output_dir=recipe.output_dir,
                  rdzv_id=args.rdzv_id or (f"dist-ft-{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ
                                           else None))


def cmd_doctor(args) -> int:
    """Inside a launcher (RANK set): one rank of the doctor. Otherwise with --nproc-per-node / --nnodes: start the
    ranks as `dist-ft launch` does, telling them the world they should form. Otherwise one process."""
    from .doctor import run_doctor
    from .doctor.world import EXPECT_ENV
    from .preflight import preflight

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if "RANK" in os.environ or (args.nproc_per_node is None and args.nnodes == 1):
            return run_doctor(recipe, source=args.recipe, expect_world_size=args.expect_world_size)
        preflight(recipe, source=args.recipe, check_output=False)
    except (RecipeError, DataError) as exc:
        return _fail(exc)
    nproc = args.nproc_per_node or 1
    os.environ[EXPECT_ENV] = str(args.expect_world_size or nproc * args.nnodes)
    return launch(args.recipe, args.overrides, nproc_per_node=nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                  rdzv_endpoint=args.rdzv_endpoint, local_addr=args.local_addr, output_dir=None, command="doctor",
                  read_timeout=recipe.distributed.timeout_seconds,
                  rdzv_id=args.rdzv_id or (f"dist-ft-doctor-{os.environ['SLURM_JOB_ID']}"
                                           if "SLURM_JOB_ID" in os.environ else None))


def cmd_slurm(args) -> int:
    from .preflight import preflight
    from .slurm import SlurmJob, submit, write_job

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                   account=args.account, job_name=args.job_name, signal_grace_seconds=args.signal_grace_seconds,
                   launcher=args.launcher, doctor=args.doctor)
    problems = job.problems()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe, source=args.recipe)
    except RecipeError as exc:
        problems = exc.problems + problems
    if problems:
        return _fail(RecipeError(problems, "dist-ft slurm"))
    if job.signal_grace_seconds < recipe.distributed.timeout_seconds:
        print(f"[dist_ft] note: --signal-grace-seconds {job.signal_grace_seconds} is shorter than "
              f"distributed.timeout_seconds {recipe.distributed.timeout_seconds}: a slow step or checkpoint may "
              "not finish before Slurm's SIGKILL", file=sys.stderr)
    path = write_job(job, Path(args.recipe), args.overrides, Path(recipe.output_dir))
    print(f"[dist_ft] wrote {path}")
    if args.submit:
        try:
            print(f"[dist_ft] submitted job {submit(path)}; log: {path.parent}/slurm-JOBID.out")
        except (OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    else:
        print(f"[dist_ft] submit with: sbatch {path}")
    return 0


def cmd_data(args) -> int:
    from .assets import resolve_model_path
    from .data.profile import data_report
    from .model import load_tokenizer
    from .preflight import data_problems

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        problems = data_problems(recipe)
        if problems:
            raise RecipeError(problems, args.recipe)
        tok = load_tokenizer(resolve_model_path(recipe.model.path), trust_remote_code=recipe.model.trust_remote_code)
        out = Path(recipe.output_dir) / "data-report"
        rep = data_report(recipe, tok, out)
    except (RecipeError, DataError) as exc:
        return _fail(exc)
    print((out / "report.md").read_text())
    print(f"[dist_ft] wrote {out}/report.md, report.json and lengths.png")
    return 0 if rep.get("tokens") else 1


def cmd_sweep(args) -> int:
    from .sweep import load_sweep, run_sweep

    try:
        cfg = load_sweep(args.sweep, args.recipe, args.overrides, trials=args.trials, parallel=args.parallel)
    except RecipeError as exc:
        return _fail(exc)
    result = run_sweep(args.recipe, args.overrides, cfg)
    return 0 if result.get("complete") else 1


def cmd_export(args) -> int:
    from .checkpoint.store import CheckpointError
    from .checkpoint.export import export

    if args.format == "gguf":
        return _export_gguf(args)
    if args.quant is not None:
        return _fail(ValueError("--quant applies to --format gguf; a Hugging Face folder takes --dtype"))
    try:
        out = export(args.source, args.out, merge_lora=args.merge_lora, dtype=args.dtype)
    except (CheckpointError, RecipeError, FileExistsError, FileNotFoundError) as exc:
        return _fail(exc)
    print(f"[dist_ft] exported to {out}")
    return 0


def _export_gguf(args) -> int:
    from .checkpoint.store import CheckpointError
    from .checkpoint.gguf_export import GGUFExportError, export_gguf, how_to_run

    if args.dtype is not None:
        return _fail(ValueError("--dtype applies to --format hf; a GGUF file takes --quant (f16, q8_0, ...)"))
    try:  # a LoRA adapter is always merged: llama.cpp reads one set of weights
        res = export_gguf(args.source, args.out, quant=args.quant or "f16")
    except (CheckpointError, RecipeError, GGUFExportError, FileExistsError, FileNotFoundError) as exc:
        return _fail(exc)
    kept = f" ({len(res.kept_f16)} tensors kept f16: rows not a multiple of the block)" if res.kept_f16 else ""
    print(f"[dist_ft] exported {res.arch} {res.quant} GGUF to {res.path}{kept}\n{how_to_run(res)}")
    return 0


def cmd_report(args) -> int:
    from .telemetry.run_report import make_report

    try:
        path, summary = make_report(args.run_dir)
    except FileNotFoundError as exc:
        return _fail(exc)
    print(f"[dist_ft] {summary}\n[dist_ft] wrote {path} and {path.parent / 'plots'}/")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(nproc=args.nproc_per_node, output_dir=args.output_dir, overrides=args.overrides)


def _doctor_parser(dr: argparse.ArgumentParser) -> None:
    for flag, kw in (("--nproc-per-node", {"type": int, "default": None}), ("--nnodes", {"type": int, "default": 1}),
                     ("--node-rank", {"type": int, "default": 0}), ("--rdzv-endpoint", {"default": None}),
                     ("--rdzv-id", {"default": None}), ("--local-addr", {"default": None})):
        dr.add_argument(flag, **kw, help="as for dist-ft launch")
    dr.add_argument("--expect-world-size", type=int, default=None, help="the world size the job asked for (default: "
                    "--nproc-per-node x --nnodes, or the Slurm allocation); a world that formed otherwise fails")
    dr.set_defaults(fn=cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-ft", description="Distributed fine-tuning from one YAML recipe.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(name: str, help_: str):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", help="path to the YAML recipe")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides")
        return s

    c = with_recipe("check", "validate a recipe and print it resolved")
    c.add_argument("--ignore-output-dir", action="store_true", help="do not complain about an existing output_dir")
    c.add_argument("--accelerate-config", default=None, metavar="FILE",
                   help="also check that `accelerate launch --config_file FILE` agrees with the recipe")
    c.set_defaults(fn=cmd_check)
    sub.add_parser("schema", help="list every recipe key with its type, default and meaning").set_defaults(
        fn=cmd_schema)
    with_recipe("train", "train in this process (or as one rank of a launcher)").set_defaults(fn=cmd_train)
    la = with_recipe("launch", "start the ranks and train")
    la.add_argument("--nproc-per-node", type=int, default=1)
    la.add_argument("--nnodes", type=int, default=1)
    la.add_argument("--node-rank", type=int, default=0)
    la.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the rendezvous (multi-node)")
    la.add_argument("--rdzv-id", default=None, help="rendezvous id shared by the nodes of one job (default: "
                    "dist-ft-$SLURM_JOB_ID under Slurm, else from the recipe's file name)")
    la.add_argument("--local-addr", default=None, help="the address other nodes reach this one at (multi-node; "
                    "default: this machine's address on the route to the rendezvous host)")
    la.set_defaults(fn=cmd_launch)
    _doctor_parser(with_recipe("doctor", "check the allocation before a long job (about a minute)"))
    sl = with_recipe("slurm", "write a Slurm batch script for the recipe into its run directory (and submit it)")
    sl.add_argument("--nodes", type=int, default=1)
    sl.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0: CPU processes")
    sl.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: the GPUs, else 1)")
    sl.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node's launcher and its ranks")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--time", default=None, help="time limit, HH:MM:SS or D-HH:MM:SS")
    sl.add_argument("--account", default=None)
    sl.add_argument("--job-name", default=None)
    sl.add_argument("--signal-grace-seconds", type=int, default=120, help="how long before the time limit the "
                    "ranks are told to checkpoint (Slurm may send it up to 60 s earlier)")
    sl.add_argument("--launcher", default="torchrun", help="torchrun (dist-ft launch) or accelerate")
    sl.add_argument("--submit", action="store_true", help="run sbatch on the written file")
    sl.add_argument("--doctor", action="store_true", help="the job runs `dist-ft doctor` on its allocation first "
                    "and trains only if it passes")
    sl.set_defaults(fn=cmd_slurm)
    with_recipe("data", "report on the recipe's data before training (sizes, lengths, labels, duplicates)"
                ).set_defaults(fn=cmd_data)
    # Listed here, parsed by plan.main (main() hands it the command line): importing the planner's GPU tables to
    # build this parser would put them (~1.4 MiB) in every training rank's memory.
    sub.add_parser("plan", add_help=False,
                   help="memory per rank and speed of a recipe on a cluster, without running it")
    sw = sub.add_parser("sweep", help="hyperparameter search: each trial a real run (grid, random, Bayesian)")
    sw.add_argument("recipe")
    sw.add_argument("sweep", help="the sweep file: method, objective, params (see dist_ft/sweep.py)")
    sw.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe, for every trial")
    sw.add_argument("--trials", type=int, default=None, help="total trials (the sweep file's by default)")
    sw.add_argument("--parallel", type=int, default=None, help="trials run at once")
    sw.set_defaults(fn=cmd_sweep)
    e = sub.add_parser("export", help="write a Hugging Face folder (or PEFT adapter) from a checkpoint or run")
    e.add_argument("source", help="a run directory (its final/ model, else its newest complete checkpoint) or a "
                                   "checkpoints/step-N folder")
    e.add_argument("out", help="the folder to write (must not exist, or be empty); with --format gguf, a new "
                               "FILE.gguf (an Ollama FILE.Modelfile is written beside it)")
    e.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a Hugging Face folder; gguf: one "
                   "file for llama.cpp and Ollama (Llama, SmolLM2, Qwen2, Mistral; LoRA merged first)")
    e.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the base weights")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="dtype of the written weights "
                   "(default: as trained)")
    e.add_argument("--quant", default=None, help="GGUF tensor type: f32, f16 (default), bf16, q8_0, q5_1, q5_0, "
                   "q4_1, q4_0")
    e.set_defaults(fn=cmd_export)
    rp = sub.add_parser("report", help="write report.md and plots (loss, lr, tokens/s, memory) for a run")
    rp.add_argument("run_dir")
    rp.set_defaults(fn=cmd_report)
    d = sub.add_parser("demo", help="fine-tune the bundled SmolLM2 on WordNet definitions, then ask it something")
    d.add_argument("--nproc-per-node", type=int, default=None, help="default: GPUs if any, else 2 CPU processes")
    d.add_argument("--output-dir", default=None)
    d.add_argument("overrides", nargs="*")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from ._quiet import quiet_third_party

    quiet_third_party(main_rank=os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0")
    from .distributed.launchers import strip_launcher_args

    from_command_line = argv is None
    argv = strip_launcher_args(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        from .plan import main as plan_main
        return plan_main(argv[1:])
    parser = build_parser()
    # Overrides may come before or after options (`launch r.yaml --nproc-per-node 2 a.b=1`).
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from .distributed import watchdog
    from .distributed.topology import hard_exit, process_group_was_used

    try:
        rc = args.fn(args)
    except BaseException as exc:
        if not (from_command_line and process_group_was_used()):
            watchdog.unwatch()
            raise
        # A rank that failed after joining a process group leaves the way one that succeeded does (hard_exit):
        # the interpreter's finalization would run gloo's and autograd's thread teardown, which can abort or hang.
        import traceback
        traceback.print_exc()
        rc = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
    if from_command_line and process_group_was_used():
        watchdog.phase("the exit", limit=watchdog.TEARDOWN_S)
        hard_exit(rc or 0)
    watchdog.unwatch()
    if from_command_line and args.fn is cmd_launch:
        # The ranks are gone and their outcome decided: nothing bounds the teardown of torchrun's store and agent
        # threads in the interpreter's finalization, and a launcher that never exits is a job that never ends.
        hard_exit(rc or 0)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
