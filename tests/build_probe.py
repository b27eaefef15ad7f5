"""Build models through a strategy's real build path and write what each rank ended up with, for
test_pretrained_weights.py to compare against `AutoModelFor*.from_pretrained` of the same folder.

    torchrun --nproc-per-node 2 tests/build_probe.py --strategy fsdp --out OUT MODEL_DIR[:TASK[:NUM_LABELS]] ...

For each model: OUT/<i>.safetensors (the full state dict gathered on rank 0) and OUT/<i>.json (the load report:
which parameters came from the checkpoint and which the recipe created).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--method", default="full")
    p.add_argument("--out", required=True)
    p.add_argument("models", nargs="+")
    a = p.parse_args()

    from safetensors.torch import save_file

    from dist_ft.config import load_recipe
    from dist_ft.distributed.precision import precision_plan
    from dist_ft.distributed.spec import make_strategy
    from dist_ft.distributed.topology import init_distributed, shutdown
    from dist_ft.model import ModelBuilder

    topo = init_distributed(timeout_seconds=300, threads_per_process=1)
    out = Path(a.out)
    for i, spec in enumerate(a.models):
        path, task, labels = (spec.split(":") + ["causal_lm", "0"])[:3]
        num_labels = int(labels) or None
        recipe_file = out / f"{i}.yaml"
        if topo.is_main:
            out.mkdir(parents=True, exist_ok=True)
            recipe_file.write_text(json.dumps({
                "output_dir": str(out / f"run-{i}"), "overwrite_output_dir": True,
                "model": {"path": path, "task": task, "num_labels": num_labels},
                "data": {"format": {"sequence_classification": "classification",
                                    "image_classification": "classification",
                                    "seq2seq_lm": "instruction"}.get(task, "text")},
                "method": {"kind": a.method},
                "distributed": {"strategy": a.strategy}}))
        torch.distributed.barrier()
        recipe = load_recipe(str(recipe_file))
        precision = precision_plan("fp32")
        builder = ModelBuilder(recipe, Path(path), num_labels=num_labels,
                               label_names=[f"c{k}" for k in range(num_labels or 0)], pad_token_id=0,
                               dtype=precision.param_dtype, attn_implementation="eager")
        strategy = make_strategy(a.strategy, topo=topo, precision=precision, activation_checkpointing=False,
                                 recipe=recipe)
        strategy.setup(builder, lambda params: torch.optim.AdamW(params, lr=1e-4))
        state = strategy.full_state_dict()
        if topo.is_main:
            save_file({k: v.detach().float().clone() for k, v in state.items()}, out / f"{i}.safetensors")
            r = builder.load_report
            (out / f"{i}.json").write_text(json.dumps({"loaded": r.loaded, "created": r.created,
                                                         "unused": r.unused, "total": r.total}))
        strategy.close()
        torch.distributed.barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
