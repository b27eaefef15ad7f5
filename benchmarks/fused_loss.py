"""The long-context job of issue 25: the head-and-loss memory of one training micro-step with and without
training.fused_loss, on a Llama-shaped model with a 128k vocabulary (Llama-3's 128,256) and 4,096-token rows.

    .venv/bin/python benchmarks/fused_loss.py                 # bf16 and fp32, fused and not, head and step
    .venv/bin/python benchmarks/fused_loss.py --hidden 512

Each measurement runs in a fresh process: the model is built (seeded random weights, 2 blocks, the head untied),
the resident high-water mark is reset (/proc/self/clear_refs), one micro-step runs (dist_ft's own training loss,
forward and backward), and the step's peak above its start is read back (VmHWM). With every position a target the
unfused head holds [4096 x 128,256] logits (1 GiB in bf16) and writes their gradient over them; the fused head holds
one chunk. Figures go to benchmarks/results/fused_loss.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

CHILD = r"""
import json, sys, time, torch
from transformers import LlamaConfig, AutoModelForCausalLM
from dist_ft.train.step import training_loss_sum
from dist_ft.host_memory import release_freed
args = json.loads(sys.argv[1])
torch.manual_seed(0)
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args["dtype"]]
cfg = LlamaConfig(hidden_size=args["hidden"], intermediate_size=args["hidden"] * 2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=args["vocab"],
                  max_position_embeddings=args["seq"], tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
model.requires_grad_(False)
for n, p in model.named_parameters():  # a LoRA-like run: the blocks' projections train, the head is frozen
    p.requires_grad_("q_proj" in n or "v_proj" in n or args["head_trains"] and n.startswith("lm_head"))
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, args["vocab"], (1, args["seq"]), generator=g)
batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
if args["part"] == "head":  # the head and the loss alone, on hidden states computed beforehand
    from dist_ft.train.fused_loss import head_loss
    from dist_ft.train.loss import loss_sum
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, :-1].contiguous()
    hidden.requires_grad_(True)
    targets = ids[0, 1:]
release_freed()
open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
t0 = time.perf_counter()
if args["part"] == "head" and args["fused"]:
    with head_loss(model, targets):
        loss = model.lm_head(hidden)
    loss.backward()
elif args["part"] == "head":
    loss = loss_sum(model.lm_head(hidden), targets, reuse_logits=True)
    loss.backward()
else:
    loss = training_loss_sum(model, batch, fused=args["fused"])
    loss.backward()
seconds = time.perf_counter() - t0
grads = [p.grad for p in model.parameters() if p.grad is not None]
if args["part"] == "head":
    grads.append(hidden.grad)
grad = sum(float(g.float().norm()) ** 2 for g in grads) ** 0.5
print(json.dumps({"loss": float(loss.detach()), "peak_above_start": status("VmHWM") - start, "seconds": seconds,
                  "grad_norm": grad}))
"""


def measure(**args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return {**args, **json.loads(out.stdout.strip().splitlines()[-1])}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtypes", default="bf16,fp32")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    rows = []
    for part, dtype, head_trains in itertools.product(("head", "step"), a.dtypes.split(","), (False, True)):
        pair = {fused: measure(vocab=a.vocab, seq=a.seq, hidden=a.hidden, dtype=dtype, fused=fused,
                               head_trains=head_trains, part=part) for fused in (False, True)}
        for r in pair.values():
            print(json.dumps(r), flush=True)
        rows.append({"part": part, "dtype": dtype, "head_trains": head_trains,
                     "unfused_mib": pair[False]["peak_above_start"] / 2**20,
                     "fused_mib": pair[True]["peak_above_start"] / 2**20,
                     "ratio": pair[True]["peak_above_start"] / pair[False]["peak_above_start"],
                     "loss_unfused": pair[False]["loss"], "loss_fused": pair[True]["loss"],
                     "loss_rel_diff": abs(pair[True]["loss"] - pair[False]["loss"]) / abs(pair[False]["loss"]),
                     "grad_norm_rel_diff": abs(pair[True]["grad_norm"] - pair[False]["grad_norm"])
                     / pair[False]["grad_norm"],
                     "seconds_unfused": pair[False]["seconds"], "seconds_fused": pair[True]["seconds"]})
    doc = {"how": f"benchmarks/fused_loss.py: 1 x {a.seq} tokens, every position a target, vocabulary {a.vocab:,}, "
                  f"hidden {a.hidden}, 2 blocks, each measurement in a fresh process; 'head': the head and the loss "
                  "alone (forward and backward) on hidden states computed beforehand, 'step': dist_ft's whole "
                  "training micro-step (its attention and blocks included); the resident peak above the start",
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_loss.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Fused head and loss (training.fused_loss)", "", doc["how"] + ".", "",
             "| part | dtype | head trains | unfused peak MiB | fused peak MiB | fused / unfused | loss rel. diff | "
             "grad norm rel. diff | s unfused | s fused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['dtype']} | {r['head_trains']} | {r['unfused_mib']:,.0f} | {r['fused_mib']:,.0f} | "
                     f"{r['ratio']:.3f} | {r['loss_rel_diff']:.1e} | {r['grad_norm_rel_diff']:.1e} | "
                     f"{r['seconds_unfused']:.1f} | {r['seconds_fused']:.1f} |")
    (RESULTS / "fused_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
