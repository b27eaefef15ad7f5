"""Real steps at scale on this machine: a Llama-shaped model with seeded random weights, trained on 2 processes.

    .venv/bin/python benchmarks/scale.py --shape 7b   --method lora  --strategy fsdp    # Llama-2-7B shape
    .venv/bin/python benchmarks/scale.py --shape 13b  --method qlora --strategy fsdp    # Llama-2-13B shape
    .venv/bin/python benchmarks/scale.py --shape 130m --method lora  --strategy fsdp    # a quick check of the script

Each run: the weights are written once (bf16 safetensors, 2 GB shards, one shard in memory at a time) to
`--models`; `dist-ft plan` predicts peak memory and step time for the recipe on this machine; the run trains one
step and stops with a checkpoint, then a second invocation resumes from it (`checkpoint.resume: auto`) and
finishes; the adapter in final/ is loaded with peft on the base and compared, tensor by tensor, with what the run
saved. The row (peak memory per rank, seconds per step, the plan's figures, the ratio) goes to
benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab): the published configs
    "130m": (768, 12, 12, 12, 2048, 32000),
    "1.1b": (2048, 22, 32, 4, 5632, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 40, 13824, 32000),
}
SHARD_BYTES = 2 * 1024 ** 3


def llama_config(folder: Path, shape: str):
    """The shape's config and a tokenizer, written to `folder` (all `dist-ft plan` reads)."""
    from transformers import LlamaConfig

    from dist_ft.testing import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    tok = make_tokenizer(folder, 8000)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, torch_dtype="bfloat16", use_cache=False)
    cfg.save_pretrained(folder)
    return cfg


def write_random_llama(folder: Path, shape: str, seed: int = 0) -> Path:
    """A Llama-shaped model folder with seeded random bf16 weights (norms 1), written tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").exists():
        return folder
    cfg = llama_config(folder, shape)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    shard, size, files, index = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, p in meta.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    total = sum(p.numel() for p in meta.parameters()) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    cfg.save_pretrained(folder)
    return folder


def recipe_for(model: Path, out: Path, method: str, strategy: str, steps: int) -> dict:
    m = {"kind": method, "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    return {"output_dir": str(out), "seed": 0, "model": {"path": str(model)},
            "data": {"train": "builtin:wordnet-definitions", "format": "instruction", "max_length": 128,
                     "max_train_samples": 64, "max_eval_samples": 2},
            "method": m,
            "training": {"max_steps": steps, "micro_batch_size": 1, "learning_rate": 1e-4, "warmup_steps": 0},
            # host_memory_trim: a CPU rank's resident set is then its tensors (what the plan counts), not also the
            # heap's freed holes (dist_ft/host_memory.py)
            "distributed": {"strategy": strategy, "precision": "bf16-true", "activation_checkpointing": True,
                            "timeout_seconds": 1800, "host_memory_trim": "blocks"},
            "checkpoint": {"every_steps": 1}}


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "a") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def adapter_matches(run_dir: Path, model: Path, method: str) -> float:
    """Largest difference between final/'s adapter as peft loads it onto the base and the saved tensors. A QLoRA
    adapter goes onto the 4-bit base, as it was trained (a 13B base in 16 bits would not fit this machine)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True) if method == "qlora" else None
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                                quantization_config=quant)
    peft_model = PeftModel.from_pretrained(base, run_dir / "final")
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    diffs = []
    for name, t in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.", 1)[-1])]
        assert len(match) == 1, (name, len(match))
        diffs.append(float((match[0].float() - t.float()).abs().max()))
    assert len(diffs) == len(loaded), (len(diffs), len(loaded))
    return max(diffs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="130m")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--strategy", default="fsdp")
    ap.add_argument("--models", default="/tmp/dist-ft-scale-models")
    ap.add_argument("--out", default="/tmp/dist-ft-scale-runs")
    ap.add_argument("--simulate", action="store_true", help="only the simulated table (no run)")
    ap.add_argument("--replan", action="store_true", help="only `dist-ft plan` again for the stored rows (after a "
                    "change to the plan): their measured figures are kept")
    a = ap.parse_args()
    import yaml

    if a.simulate:
        doc = load_results()
        doc["simulated"] = simulate_table()
        save_results(doc)
        return 0
    if a.replan:
        doc = load_results()
        for row in doc["runs"]:
            folder = Path(a.out) / f"config-{row['shape']}"
            llama_config(folder, row["shape"])
            path = folder / "recipe.yaml"
            path.write_text(yaml.safe_dump(recipe_for(folder, folder / "run", row["method"], row["strategy"], 2)))
            row.update(plan_columns(plan_for(path), row["peak_mib_per_rank"]))
            print(row, flush=True)
        save_results(doc)
        return 0

    model = write_random_llama(Path(a.models) / f"llama-{a.shape}", a.shape)
    name = f"{a.shape}-{a.method}-{a.strategy}"
    out = Path(a.out) / name
    if out.exists():
        sys.exit(f"{out} exists: remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_for(model, out, a.method, a.strategy, steps=2)))
    log = out.parent / f"{name}.log"
    plan = plan_for(path)
    cli = [sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", "2"]
    rc1, t1 = run(cli + ["training.stop_after_steps=1"], log)
    if rc1 != 0:
        sys.exit(f"the first invocation failed (exit {rc1}): see {log}")
    rc2, t2 = run(cli + ["checkpoint.resume=auto"], log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step_time" in r]
    ends = [r for r in records if r.get("event") == "end"]
    resumed = [r for r in records if r.get("event") == "start" and r.get("resumed_from")]
    row = {"shape": a.shape, "method": a.method, "strategy": a.strategy, "exit": [rc1, rc2],
           "resumed": bool(resumed), "seconds_per_step": [round(s["step_time"], 1) for s in steps],
           "peak_mib_per_rank": ends[-1]["peak_memory_mb"] if ends else None, "wall_s": [round(t1), round(t2)],
           "adapter_max_diff": adapter_matches(out, model, a.method) if rc2 == 0 else None,
           **plan_columns(plan, ends[-1]["peak_memory_mb"] if ends else None)}
    print(json.dumps(row, indent=1))
    doc = load_results()
    doc["runs"] = [r for r in doc["runs"] if (r["shape"], r["method"], r["strategy"])
                   != (a.shape, a.method, a.strategy)] + [row]
    save_results(doc)
    return 0 if rc1 == rc2 == 0 else 1


def plan_for(recipe: Path) -> dict:
    return json.loads(subprocess.run([sys.executable, "-m", "dist_ft", "plan", str(recipe), "--nodes", "1",
                                      "--gpus-per-node", "2", "--gpu", "cpu", "--json"], cwd=REPO,
                                     capture_output=True, text=True, check=True).stdout)


def plan_columns(plan: dict, peaks: list | None) -> dict:
    speed = plan.get("speed") or {}
    cols = {"plan_gib_per_rank": plan.get("device_total_gib") or plan.get("total_gib"),
            "plan_step_s": speed.get("step_s"), "plan_compute_s": speed.get("compute_s"),
            "plan_comm_s": speed.get("comm_s")}
    if peaks and cols["plan_gib_per_rank"]:
        cols["measured_over_plan"] = round(max(peaks) / 1024 / cols["plan_gib_per_rank"], 3)
    return cols


def load_results() -> dict:
    store = RESULTS / "scale.json"
    doc = json.loads(store.read_text()) if store.exists() else {}
    if isinstance(doc, list):  # the first version held the runs only
        doc = {"runs": doc}
    return {"runs": [], "simulated": [], "hybrid": None, **doc}


def save_results(doc: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "scale.md").write_text(render(doc))


def simulate_table() -> list[dict]:
    """`dist-ft plan --simulate`: the real model on meta, FSDP2's own wrap code under a fake process group, rank 0's
    bytes read off its shards beside the plan's formula, at 8, 64 and 1,024 ranks."""
    from dist_ft.config import load_recipe
    from dist_ft.plan.simulate import simulate

    rows = []
    for model, method in (("llama-3-8b", "full"), ("llama-3-8b", "lora"), ("llama-3-70b", "lora"),
                          ("llama-3.1-405b", "lora")):
        recipe = load_recipe(None, [f"model.path=builtin:{model}", f"method.kind={method}", "method.lora.r=16",
                                    "distributed.strategy=fsdp", "distributed.precision=bf16-mixed"])
        sim = simulate(recipe, [8, 64, 1024])
        for r in sim.rows:
            rows.append({"model": model, "method": method, "world": r.world, "quantity": r.quantity,
                         "simulated_bytes": r.simulated, "planned_bytes": r.planned, "ratio": round(r.ratio, 4)})
    return rows


def render(doc: dict) -> str:
    lines = ["# Scale on this machine", "",
             "## Real steps (2 processes, bf16-true, activation checkpointing)", "",
             "`benchmarks/scale.py --shape S --method M` (see its docstring): seeded random weights in a Llama-shaped "
             "folder, one step, a checkpoint, a resumed second step, final/'s adapter loaded with peft and compared "
             "with the saved tensors. The plan's step is its timed block's compute and gloo's collectives "
             "(parameter all-gathers at FSDP2's unshard rate, benchmarks/results/unshard-rate.md), overlapped but for "
             "a share of the shorter (dist_ft/plan/speed.py).", "",
             "| shape | method | strategy | exit (stop, resume) | s/step | plan s/step (compute, comm) | "
             "s/step measured / plan | peak MiB per rank | plan GiB per rank | memory measured / plan | "
             "adapter max diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        plan_s = r.get("plan_step_s") or 0
        split = f" ({r['plan_compute_s']:.3g}, {r['plan_comm_s']:.3g})" if r.get("plan_comm_s") is not None else ""
        ratio = ", ".join(f"{x / plan_s:.2f}" for x in r["seconds_per_step"]) if plan_s else ""
        lines.append(f"| {r['shape']} | {r['method']} | {r['strategy']} | {r['exit']} | "
                     f"{', '.join(map(str, r['seconds_per_step']))} | {plan_s:.3g}{split} | {ratio} | "
                     f"{', '.join(f'{x:,.0f}' for x in r['peak_mib_per_rank'] or [])} | "
                     f"{r['plan_gib_per_rank']:.2f} | {r.get('measured_over_plan', '')} | "
                     f"{r['adapter_max_diff']} |")
    if doc["simulated"]:
        lines += ["", "## Simulated scale (`benchmarks/scale.py --simulate`, `dist-ft plan --simulate`)", "",
                  "FSDP2, bf16-mixed: the real model on the meta device sharded by FSDP2's own wrap code under a fake "
                  "process group; rank 0's bytes read off its shards, beside `dist-ft plan`'s formula.", "",
                  "| model | method | ranks | quantity | simulated MiB | plan MiB | ratio |", "|---|---|---|---|---|---|---|"]
        for r in doc["simulated"]:
            lines.append(f"| {r['model']} | {r['method']} | {r['world']:,} | {r['quantity']} | "
                         f"{r['simulated_bytes'] / 2**20:,.1f} | {r['planned_bytes'] / 2**20:,.1f} | {r['ratio']} |")
    h = doc.get("hybrid")
    if h:
        lines += ["", "## Hybrid vs plain sharding across nodes", "", h["how"], "",
                  "| strategy | MiB across the node boundary |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in h["mib"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
