"""The plan as text (one table per rank, then the verdict, the speed and the notes; `--all-strategies` as one row per
variant) and as a JSON-ready dict."""

from __future__ import annotations

import dataclasses

from .compare import recommend
from .constants import CPU_COMM_CONTENTION, GIB, MAX_MICRO_BATCH
from .verdict import Plan


def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(headers), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def render(plan: Plan) -> str:
    r, c, f, mc = plan.recipe, plan.cluster, plan.facts, plan.counts
    d, t = r.distributed, r.training
    tokens = plan.micro_batch * plan.seq * t.gradient_accumulation_steps * c.world
    lines = [f"model     {f.path} ({f.cls_name}; {f.source})",
             f"          {f.total:,} parameters" + (" (tied embeddings counted once)" if f.tied else ""),
             f"method    {mc.kind}: {mc.n_trainable:,} trainable ({100 * mc.n_trainable / max(mc.n_total, 1):.2f}% "
             f"of {mc.n_total:,})" + (f", LoRA on {len(mc.lora_targets)} Linear modules" if mc.lora_targets else ""),
             f"run       {d.strategy}, {d.precision}, {t.optimizer}, offload {d.offload}, activation checkpointing "
             f"{'on' if d.activation_checkpointing else 'off'}",
             f"cluster   {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.world} rank(s); "
             f"{c.device_memory_gib:.2f} GiB per {'process' if c.is_cpu else 'GPU'}"
             + (f"; {c.cpu_memory_gib:.0f} GiB host memory per node" if c.cpu_memory_gib else ""),
             f"batch     micro-batch {plan.micro_batch} x {plan.seq} tokens x {t.gradient_accumulation_steps} "
             f"accumulation x {c.world} ranks = {tokens:,} tokens per step", ""]
    phase = {"resident": "", "fwd_bwd": "fwd/bwd", "step": "step", "save": "save", "load": "load", "runtime": ""}
    body = [[row.component, row.detail, _g(row.device), _g(row.cpu) if row.cpu else "", phase[row.phase]]
            for row in plan.rows]
    body.append(["", "", "", "", ""])
    body.append(["total", "resident + max(fwd/bwd, step, save" + (", load" if plan.load else "") + ") + runtime", _g(plan.device_total),
                 _g(plan.cpu_per_rank) if plan.cpu_per_rank else "", ""])
    lines += _table(["per rank", "what", "device GiB", "CPU GiB", "phase"], body, {2, 3})
    lines.append("")
    lines += _verdict_lines(plan)
    return "\n".join(lines)


def _verdict_lines(plan: Plan) -> list[str]:
    c = plan.cluster
    lines = [f"peaks     resident {_g(plan.resident)} + fwd/bwd {_g(plan.fwd_bwd)} | optimizer step "
             f"{_g(plan.step)} | final save {_g(plan.save)}" + (f" | load {_g(plan.load)}" if plan.load else "")
             + " GiB"]
    margin = plan.margin_gib
    lines.append(f"verdict   {plan.verdict.upper()}: {plan.device_total / GIB:.2f} of {c.device_memory_gib:.2f} GiB "
                 f"per {'process' if c.is_cpu else 'GPU'}, margin {margin:+.2f} GiB")
    if not c.is_cpu:
        host = plan.cpu_per_rank * c.gpus_per_node
        lines.append(f"host      {host / GIB:.2f} GiB per node ({c.gpus_per_node} ranks"
                     + (f"; the model is built whole on CPU first: {_g(plan.cpu_load_peak)} GiB per rank"
                        if plan.cpu_load_peak else "") + ")"
                     + ("" if plan.cpu_fits is None else f" of {c.cpu_memory_gib:.0f} GiB: "
                        + ("ok" if plan.cpu_fits else "TOO MUCH")))
    if plan.max_micro_batch is not None:
        lines.append(f"largest micro-batch that fits: {plan.max_micro_batch}"
                     + (" (the search stops at 1024)" if plan.max_micro_batch == MAX_MICRO_BATCH else ""))
    s = plan.speed
    lines.append(f"flops     {s['forward_flops_per_token'] / 1e9:.2f} GFLOP/token forward, x{s['flops_multiple']:.2f} "
                 f"for training = {s['train_flops_per_token'] / 1e9:.2f} GFLOP/token")
    if s["comm_bytes_per_rank"]:
        lines.append(f"comm      {s['comm_bytes_per_rank'] / 1e9:.2f} GB per rank per step ({s['comm_what']}) at "
                     f"{s['bandwidth_gbps']:g} GB/s {s['link']}: {s['comm_s']:.3f} s")
    if s["offload_s"]:
        lines.append(f"offload   {s['offload_s']:.3f} s per step ({s['offload_what']})")
    if s["step_s"] and s.get("compute_source"):
        lines.append(f"speed     compute {s['compute_s']:.3f} s ({s['compute_source']}); step {_sig(s['step_s'])} s "
                     f"(the longer of compute and communication + {CPU_COMM_CONTENTION:.0%} of the shorter: the same cores "
                     f"run both); {_sig(s['tokens_per_s'])} tokens/s "
                     f"({_sig(s['tokens_per_s_per_rank'])} per rank)")
    elif s["step_s"]:
        lines.append(f"speed     compute {s['compute_s']:.3f} s at {c.mfu:.0%} MFU of {s['peak_flops'] / 1e12:.3g} "
                     f"TFLOP/s ({s['peak_source']}); step {_sig(s['step_s'])} s; {_sig(s['tokens_per_s'])} tokens/s "
                     f"({_sig(s['tokens_per_s_per_rank'])} per rank)")
    else:
        lines.append("speed     no peak FLOP/s known for this device (pass --peak-tflops)")
    for n in plan.notes:
        lines.append(f"note      {n}")
    return lines


def render_comparison(plans: list[Plan], recipe) -> str:
    order = sorted(plans, key=lambda p: (p.verdict != "fits", -round(p.speed.get("tokens_per_s") or 0, 6),
                                         p.speed["comm_s"], -p.margin_gib))
    body = []
    for p in order:
        s = p.speed
        body.append([p.recipe.distributed.strategy, p.recipe.distributed.offload, p.counts.kind,
                     f"{p.counts.n_trainable:,}", _g(p.device_total), _g(p.cpu_per_rank), p.verdict,
                     f"{p.margin_gib:+.2f}", str(p.max_micro_batch),
                     f"{s['step_s']:.3f}" if s.get("step_s") else "-",
                     f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"])
    lines = _table(["strategy", "offload", "method", "trainable", "device GiB", "host GiB", "verdict", "margin",
                    "max mb", "step s", "tokens/s"], body, {3, 4, 5, 7, 8, 9, 10})
    best = recommend(plans)
    same = recommend(plans, recipe.method.kind)
    lines.append("")
    lines.append("fastest that fits: " + (best.label if best else "none"))
    if same is not None and same is not best:
        lines.append(f"fastest that fits with method {recipe.method.kind}: {same.label}")
    elif same is None and recipe.method.kind != (best.counts.kind if best else None):
        lines.append(f"nothing fits with method {recipe.method.kind}")
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    r, c, f, mc = plan.recipe, plan.cluster, plan.facts, plan.counts
    return {
        "model": {"path": f.path, "class": f.cls_name, "source": f.source, "parameters": f.total, "tied": f.tied,
                  "hidden": f.hidden, "layers": f.layers, "vocab": f.vocab},
        "method": {"kind": mc.kind, "trainable": mc.n_trainable, "frozen": mc.n_frozen, "quantized": mc.n_quantized,
                   "total": mc.n_total, "lora_targets": len(mc.lora_targets)},
        "run": {"strategy": r.distributed.strategy, "precision": r.distributed.precision,
                "offload": r.distributed.offload, "optimizer": r.training.optimizer,
                "activation_checkpointing": r.distributed.activation_checkpointing,
                "micro_batch": plan.micro_batch, "seq": plan.seq,
                "gradient_accumulation_steps": r.training.gradient_accumulation_steps},
        "cluster": dataclasses.asdict(c) | {"world": c.world},
        "rows": [{"key": row.key, "component": row.component, "detail": row.detail, "phase": row.phase,
                  "device_gib": row.device / GIB, "cpu_gib": row.cpu / GIB, "device_bytes": row.device,
                  "cpu_bytes": row.cpu} for row in plan.rows],
        "activations_gib": {"no_ac": plan.activations["no_ac"] / GIB, "ac": plan.activations["ac"] / GIB},
        "resident_gib": plan.resident / GIB, "fwd_bwd_gib": plan.fwd_bwd / GIB, "step_gib": plan.step / GIB,
        "save_gib": plan.save / GIB,
        "load_gib": plan.load / GIB,
        "device_total_gib": plan.device_total / GIB, "device_memory_gib": c.device_memory_gib,
        "margin_gib": plan.margin_gib, "fits": plan.fits, "cpu_per_rank_gib": plan.cpu_per_rank / GIB,
        "cpu_fits": plan.cpu_fits, "verdict": plan.verdict, "max_micro_batch": plan.max_micro_batch,
        "speed": plan.speed, "notes": plan.notes,
    }


def _sig(x: float) -> str:
    """Three significant figures, with thousands separators for large values: 5,043 / 12.3 / 0.0417 (never 0)."""
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}"
