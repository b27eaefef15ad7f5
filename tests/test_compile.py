"""training.compile: each transformer block compiled before the backend wraps or shards the model
(dist_ft/distributed/compile.py). Compiled against eager: the outputs and every gradient in one process, and the
losses of 2-rank DDP and FSDP2 runs; what it refuses; compile time reported apart from step time."""

from __future__ import annotations

import pytest
import torch

from dist_ft.distributed import compile as C

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe


def test_refuses_backends_and_methods_it_cannot_compile(tmp_path, tiny_llama):
    from dist_ft.config import RecipeError, recipe_from_dict
    for sections, needle in [({"distributed": {"strategy": "zero3"}}, "zero3 is not supported"),
                             ({"method": {"kind": "qlora"}}, "method.kind qlora")]:
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(tiny_recipe(tiny_llama, tmp_path / "o", training={"compile": True}, **sections))
        assert "training.compile" in str(e.value) and needle in str(e.value)


def test_a_machine_without_a_compiler_is_told_before_training(monkeypatch):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    assert "no C++ compiler" in C.why_not_compilable(torch.device("cpu"))
    monkeypatch.undo()
    assert C.why_not_compilable(torch.device("cpu")) is None  # this machine has g++


def test_compiled_blocks_equal_eager_in_outputs_and_gradients(tiny_llama):
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (2, 16), generator=g)
    results = []
    for compiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
        names = [n for n, _ in model.named_parameters()]
        if compiled:
            assert C.compile_blocks(model) == model.config.num_hidden_layers
            assert [n for n, _ in model.named_parameters()] == names  # checkpoints and saves see the same names
        before = C.compile_seconds()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if compiled:
            assert C.compile_seconds() > before  # the first call compiled, and it was counted
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_logits, eager_grads), (comp_logits, comp_grads) = results
    assert torch.allclose(comp_logits, eager_logits, atol=1e-5, rtol=1e-5)
    for n, grad in eager_grads.items():
        assert torch.allclose(comp_grads[n], grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_compiled_train_what_eager_trains(tmp_path, tiny_llama, strategy):
    """Compiled before DDP's wrap and before FSDP2's sharding, with activation checkpointing: 2 ranks, 3 steps,
    losses equal to eager's; the records give compile time apart from step time."""
    losses, records = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"{strategy}-{compiled}"
        recipe = tiny_recipe(tiny_llama, out, method={"kind": "full"},
                             training={"max_steps": 3, "micro_batch_size": 2, "compile": compiled},
                             distributed={"strategy": strategy, "activation_checkpointing": True})
        r = run_cli("launch", str(write_recipe(tmp_path / f"{strategy}-{compiled}.yaml", recipe)),
                    "--nproc-per-node", "2", timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        records[compiled] = read_metrics(out)[0]
        losses[compiled] = [x["loss"] for x in records[compiled]]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    first = records[True][0]
    assert first["compile_s"] > 0 and first["step_time_without_compile"] == pytest.approx(
        first["step_time"] - first["compile_s"])
    assert "compile_s" not in records[False][0]
