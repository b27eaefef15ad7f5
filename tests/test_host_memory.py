"""Host memory handed back to the OS (dist_ft/host_memory.py): freed heap pages between kept allocations leave the
resident set after `release_freed`; the loader trims as it reads; `distributed.host_memory_trim: blocks` trims
before every transformer block's forward and trains exactly what the default trains."""

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")

# A load's pattern in miniature: per weight a transient buffer (freed) and a kept shard above it, both under the
# mmap threshold (so from the heap), 64 times: ~380 MiB of holes. Prints the memory held before, after the frees,
# after release_freed (MiB), and the MiBs kept. Swapped pages count as held: CI once saw the holes leave RssAnon
# before any trim, which only swapping (or a kernel that drops pages) explains.
_FRAGMENT = textwrap.dedent("""
    import ctypes, torch
    from dist_ft.host_memory import release_freed
    ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD fixed at 32 MiB: all from the heap
    def rss():  # anonymous memory the process holds: resident, or swapped out (a loaded host swaps idle holes)
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return sum(int(fields[k].split()[0]) for k in ("RssAnon", "VmSwap") if k in fields) / 1024
    base, kept = rss(), []
    for i in range(64):
        scratch = torch.ones(2**20 + i * 2**14)  # 4 MiB and up, freed: each larger than the last, fits no old hole
        kept.append(torch.ones(2**18))           # 1 MiB kept, above it
        del scratch
    before = rss()
    assert release_freed()
    print(base, before, rss(), len(kept))
""")




def test_release_freed_returns_the_heaps_free_pages():
    runs = []
    for _ in range(3):  # a host under memory pressure may take the holes first; one clean run of three is asked
        out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True,
                             check=True).stdout.split()
        base, before, after, kept = map(float, out)
        runs.append(out)
        assert kept == 64  # MiB
        assert after < base + kept + 32, out  # after the trim, what is left is the kept tensors
        if before > base + kept + 250:  # the holes stayed resident between the kept MiBs until trimmed
            return
    raise AssertionError(f"the freed holes never stayed resident, nothing for the trim to return: {runs}")


def test_the_loader_trims_every_256_mib_it_reads(monkeypatch, tiny_llama):
    from dist_ft import host_memory
    from dist_ft.weights import ModelWeights

    calls = []
    monkeypatch.setattr(host_memory, "release_freed", lambda: calls.append(1) or True)
    w = ModelWeights(tiny_llama, seed=0)
    w.trimmer.every = 4096
    name = next(k for k in w.files if k.endswith("mlp.up_proj.weight"))
    with __import__("safetensors").safe_open(w.files[name], framework="pt") as fh:
        shape = fh.get_slice(name).get_shape()
    rows = w.rows(name, torch.Size(shape), 0, shape[0], torch.float32)
    nbytes = rows.numel() * 2  # read in the file's bf16... or whatever the file holds
    assert len(calls) >= 1 and rows.shape == torch.Size(shape)
    w.trimmer.every, w.trimmer.pending, calls[:] = 10 ** 12, 0, []
    w.rows(name, torch.Size(shape), 0, shape[0], torch.float32)
    assert calls == [] and w.trimmer.pending >= nbytes


def test_blocks_mode_trims_before_each_block_forward_and_backward(monkeypatch, tiny_llama):
    from transformers import AutoModelForCausalLM

    from dist_ft import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "release_freed", lambda: calls.append(1) or True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    # transformers' checkpointing recomputes a block by calling its forward, past the module hooks: the backward
    # trims must come from somewhere else (the block output's gradient hook)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert host_memory.trim_before_blocks(model, torch.device("cpu")) is None
    layers = model.config.num_hidden_layers
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == 1 + layers  # the model's start, then each block
    calls.clear()
    out = model(input_ids=ids, labels=ids)
    assert len(calls) == 1 + layers
    out.loss.backward()
    assert len(calls) == 1 + 2 * layers  # and before each block's backward
    assert "CPU devices only" in host_memory.trim_before_blocks(model, torch.device("meta"))
    calls.clear()
    model(input_ids=ids)
    assert len(calls) == 1 + layers  # nothing more hooked for another device


def test_blocks_mode_trains_what_the_default_trains(tmp_path, tiny_llama):
    losses = {}
    for mode in ("load", "blocks"):
        out = tmp_path / mode
        recipe = tiny_recipe(tiny_llama, out, training={"max_steps": 3, "micro_batch_size": 2},
                             distributed={"strategy": "ddp", "activation_checkpointing": True,
                                          "host_memory_trim": mode})
        r = run_cli("train", str(write_recipe(tmp_path / f"{mode}.yaml", recipe)), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        losses[mode] = [x["loss"] for x in read_metrics(out)[0]]
    assert len(losses["load"]) == 3 and losses["blocks"] == losses["load"]
