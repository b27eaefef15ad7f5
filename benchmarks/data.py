"""Tokenization and loading throughput, in memory vs streaming, on a corpus of at least 1 GB of text.

    python benchmarks/data.py [--gib 1.0] [--tokenizer smollm2-135m-instruct]

The corpus is assembled once (cached under ~/.cache/dist_ft/bench-corpus) from the installed data: WordNet
definitions, fortunes and CPython's pydoc topics, each text varied by a counter so that the corpus is not one
block repeated, written as 64 .jsonl shards. Each mode runs in its own process (peak resident memory is per
process): `memory` loads every shard and tokenizes everything up front (what data.streaming: false does, without the
cache), `stream` reads the shards record by record through StreamingRows with packing. Prints a table and writes
benchmarks/results/data.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 64


def build_corpus(folder: Path, gib: float) -> tuple[int, int]:
    """(records, bytes) of the corpus in `folder`, writing it first if it is not complete."""
    done = folder / "DONE-v2"
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta["gib"] >= gib:
            return meta["records"], meta["bytes"]
    from dist_ft.data.sources import resolve_source

    texts = []
    for spec in ("builtin:wordnet-definitions", "builtin:fortunes", "builtin:pydoc"):
        for r in resolve_source(spec).load():
            t = r.get("text") or (f"{r.get('prompt', '')}\n{r.get('response', '')}")
            if t.strip():
                texts.append(t)
    folder.mkdir(parents=True, exist_ok=True)
    target = int(gib * 2**30)
    handles = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(SHARDS)]
    written = records = 0
    round_ = 0
    # Records of ~2,000 characters (several texts joined), like documents: per-record overhead does not dominate.
    chunk: list[str] = []
    while written < target:
        for t in texts:
            chunk.append(t)
            if sum(map(len, chunk)) < 2000:
                continue
            line = json.dumps({"text": f"[{round_}] " + "\n\n".join(chunk)}) + "\n"
            chunk = []
            handles[records % SHARDS].write(line)
            written += len(line.encode())
            records += 1
            if written >= target:
                break
        round_ += 1
    for h in handles:
        h.close()
    done.write_text(json.dumps({"gib": gib, "records": records, "bytes": written}))
    return records, written


def _run_mode(mode: str, folder: Path, tokenizer: str, limit: int) -> dict:
    from dist_ft.assets import resolve_model_path
    from dist_ft.config import load_recipe
    from dist_ft.model import load_tokenizer

    tok = load_tokenizer(resolve_model_path(tokenizer))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "memory":
        from dist_ft.data.dataset import _tokenize
        shards = sorted(folder.glob("part-*.jsonl"))
        sources = "[" + ", ".join(f"{{path: {p}, name: s{i}}}" for i, p in enumerate(shards)) + "]"
        recipe = load_recipe(None, [f"data.train={sources}", "data.format=text", "data.max_length=1024",
                                    "data.eval_fraction=0.0", "data.shuffle=false", "seed=0"])
        data = _tokenize(recipe, tok, lambda m: None)
        samples = len(data.train)
        tokens = sum(len(e.input_ids) for e in data.train)
    else:
        from dist_ft.data.dataset import _spec
        from dist_ft.data.streaming import StreamingRows
        recipe = load_recipe(None, ["data.format=text", "data.max_length=1024"])
        stream = StreamingRows(str(folder), tok, _spec(recipe, "text", recipe.data.columns), rank=0,
                               world_size=1, packing=True)
        tokens = 0
        while stream.stats.records < limit:  # one pass over the corpus (the stream itself goes on forever)
            tokens += sum(len(r.input_ids) for r in stream.take(256))
        samples = stream.stats.kept
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "samples": samples, "tokens": tokens, "seconds": round(seconds, 1),
            "samples_per_s": round(samples / seconds), "tokens_per_s": round(tokens / seconds),
            "peak_rss_mib": round(peak), "rss_before_mib": round(base)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    ap.add_argument("--mode", choices=["memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        meta = json.loads((Path(args.folder) / "DONE-v2").read_text())
        print(json.dumps(_run_mode(args.mode, Path(args.folder), args.tokenizer, meta["records"])))
        return
    from dist_ft.assets import cache_root
    folder = cache_root() / "bench-corpus-v2"
    t0 = time.perf_counter()
    records, size = build_corpus(folder, args.gib)
    print(f"[bench] corpus: {records:,} records, {size / 2**30:.2f} GiB in {SHARDS} shards ({folder}; "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    results = []
    for mode in ("stream", "memory"):
        res = subprocess.run([sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--tokenizer",
                              args.tokenizer], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            results.append({"mode": mode, "error": res.stderr.strip().splitlines()[-1][:200]})
            continue
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"[bench] {results[-1]}", flush=True)
    lines = [f"# Data loading, {size / 2**30:.2f} GiB of text ({records:,} records, {SHARDS} shards)", "",
             f"Command: `python benchmarks/data.py --gib {args.gib}`", "",
             "| mode | samples | tokens | seconds | samples/s | tokens/s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['samples']:,} | {r['tokens']:,} | {r['seconds']} | "
                         f"{r['samples_per_s']:,} | {r['tokens_per_s']:,} | {r['peak_rss_mib']:,} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = ROOT / "benchmarks" / "results"
    (out / "data.md").write_text(table)
    (out / "data.json").write_text(json.dumps({"records": records, "bytes": size, "results": results}, indent=1))


if __name__ == "__main__":
    main()
