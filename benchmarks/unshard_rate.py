"""How fast FSDP2 unshards a block over gloo on this machine: the measurement behind `dist-ft plan`'s
CPU_UNSHARD_GBPS (dist_ft/plan/constants.py).

    .venv/bin/python benchmarks/unshard_rate.py            # 130m, 1.1B, 7B and 13B Llama block shapes, 2 ranks

For each shape: 4 blocks of the shape's seven projections in bf16, each `fully_shard`ed, then `unshard()` +
`reshard()` of every block, 3 rounds after a warm-up. What a rank receives per unshard is half the block; the rate
is those bytes over the time. Beside it, a raw `all_gather_into_tensor` of the same bytes into a preallocated buffer:
the difference is FSDP2's fresh output buffer (page faults on large blocks) and its copy-out into the parameters.
Results: benchmarks/results/unshard-rate.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPES = {"130m": (768, 2048), "1.1b": (2048, 5632), "7b": (4096, 11008), "13b": (5120, 13824)}


def worker(hidden: int, inter: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(4))
            self.mlp = nn.ModuleList([nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False),
                                      nn.Linear(inter, hidden, bias=False)])

    with torch.device("meta"):
        blocks = nn.ModuleList(Block() for _ in range(4))
    for b in blocks:
        fully_shard(b)
    blocks.to_empty(device="cpu")
    blocks.to(torch.bfloat16)
    block_bytes = sum(p.numel() for p in blocks[0].parameters()) * 2  # whole block, bf16 (a DTensor counts globally)
    received = block_bytes * (dist.get_world_size() - 1) / dist.get_world_size()

    def cycle():
        for b in blocks:
            b.unshard()
            b.reshard()

    cycle()
    t0 = time.perf_counter()
    for _ in range(3):
        cycle()
    unshard_s = (time.perf_counter() - t0) / (3 * len(blocks))
    inp = torch.empty(block_bytes // 2 // dist.get_world_size(), dtype=torch.bfloat16)
    out = torch.empty(block_bytes // 2, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(out, inp)
    t0 = time.perf_counter()
    for _ in range(4):
        dist.all_gather_into_tensor(out, inp)
    raw_s = (time.perf_counter() - t0) / 4
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"block_mib": block_bytes / 2**20, "unshard_s": unshard_s,
                                      "unshard_gbps": received / unshard_s / 1e9, "raw_s": raw_s,
                                      "raw_gbps": received / raw_s / 1e9}), flush=True)
    dist.destroy_process_group()


def main() -> int:
    if len(sys.argv) == 3:
        worker(int(sys.argv[1]), int(sys.argv[2]))
        return 0
    rows = []
    for name, (hidden, inter) in SHAPES.items():
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-port", "29671", __file__, str(hidden), str(inter)], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: the run failed:\n{out.stderr[-3000:]}")
        rows.append({"shape": name, **json.loads(line[7:])})
        print(rows[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "unshard-rate.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = ["# FSDP2 unshard rate over gloo (2 CPU ranks, 1 thread each)", "",
          "Command: `python benchmarks/unshard_rate.py`. GB/s = the bytes one rank receives per unshard (half the "
          "block) over the time; raw = `all_gather_into_tensor` into a preallocated buffer. `dist-ft plan` charges "
          "CPU parameter all-gathers at CPU_UNSHARD_GBPS.", "",
          "| block shape | block MiB (bf16) | unshard s | unshard GB/s | raw all-gather s | raw GB/s |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['shape']} | {r['block_mib']:,.0f} | {r['unshard_s']:.3f} | {r['unshard_gbps']:.3f} | "
           f"{r['raw_s']:.3f} | {r['raw_gbps']:.3f} |" for r in rows]
    (RESULTS / "unshard-rate.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
