"""Telemetry: W&B offline history read back from its own file, run id across resume, the key never written,
MFU by hand, TensorBoard events, failures that only warn, and `dist-ft report`."""

import json
import struct
from pathlib import Path

import pytest

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe

SECRET = "wandb-secret-key-0123456789abcdef0123456789abcdef"


def wandb_records(path: Path):
    """Every record of a W&B transaction log (.wandb): a LevelDB-style log of protobuf records in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            yield rec


def wandb_run(run_dir: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of the newest offline run in run_dir/wandb."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, list((run_dir / "wandb").iterdir())
    run_id, rows = None, []
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
            elif kind == "history":
                rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return run_id, rows


def _recipe(tmp_path, model, **sections):
    out = tmp_path / "run"
    logging = {"wandb": {"mode": "offline", "project": "dist-ft-tests"}, "tensorboard": True,
               **sections.pop("logging", {})}
    return out, write_recipe(tmp_path / "r.yaml", tiny_recipe(model, out, logging=logging, **sections))


def test_wandb_offline_history_run_id_and_no_key(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama, training={"max_steps": 6},
                        checkpoint={"every_steps": 3, "keep_last": None})
    env = {"WANDB_API_KEY": SECRET}
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "training.stop_after_steps=3", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    first_id, _ = wandb_run(out)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "checkpoint.resume=auto", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run_id, rows = wandb_run(out)
    metrics_train, metrics_eval = read_metrics(out)
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert run_id == first_id == start["run_id"]  # the resumed run continues the same W&B run
    logged = {r["_step"]: r for r in rows if "loss" in r}
    for m in metrics_train:
        assert logged[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-9)
        assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_mb"} <= set(logged[m["step"]])
    assert any("eval_loss" in r for r in rows)
    # One W&B run per invocation, from rank 0 only.
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    # The key is nowhere in the run directory (wandb files, config dumps, checkpoints, metrics, TensorBoard)
    # and not in what the run printed.
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in res.stdout + res.stderr
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_online_without_a_key_goes_offline_and_says_so(monkeypatch):
    from dist_ft.telemetry.tracker import wandb_mode
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    mode, note = wandb_mode("online")
    assert mode == "offline" and "wandb sync" in note
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode("online") == ("online", None)
    assert wandb_mode("disabled") == ("disabled", None)


def test_mfu_by_hand():
    from transformers import LlamaConfig

    from dist_ft.telemetry.flops import flops_per_token, mfu
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=512)
    # attention 64*64 (q) + 2*64*32 (k, v) + 64*64 (o) = 12,288; SwiGLU MLP 3*64*128 = 24,576 per layer;
    # N = 2 * 36,864 + 64*512 (output projection) = 106,496; 6N + 12*L*d*T at T=32: 638,976 + 49,152.
    assert flops_per_token(cfg, 32) == 688_128
    assert mfu(688_128, 1_000, 1e9, 2) == pytest.approx(0.344064)


def test_a_failing_sink_only_warns(tmp_path, capsys):
    from dist_ft.telemetry.tracker import Tracker as Telemetry

    class Broken:
        def log(self, record):
            raise OSError("No space left on device")

        def close(self):
            pass

    tel = Telemetry(enabled=True, out=tmp_path)
    tel.sinks["tensorboard"] = Broken()
    tel.write({"step": 1, "loss": 2.0})
    tel.write({"step": 2, "loss": 1.5})
    tel.close()
    assert "switched off" in capsys.readouterr().err
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A sink that cannot start (TensorBoard into a path that is a file) warns too.
    (tmp_path / "blocked").write_text("")
    from types import SimpleNamespace
    cfg = SimpleNamespace(wandb=SimpleNamespace(mode="disabled"), tensorboard=True)
    (tmp_path / "blocked2").mkdir()
    (tmp_path / "blocked2" / "tensorboard").write_text("a file, not a folder")
    tel = Telemetry(enabled=True, out=tmp_path / "blocked2", logging_cfg=cfg)
    assert "tensorboard" not in tel.sinks and "could not start" in capsys.readouterr().err
    tel.close()


def test_report_of_a_finished_and_of_a_running_run(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama, logging={"wandb": {"mode": "disabled"}, "tensorboard": False},
                        training={"max_steps": 6, "eval_every": 2})
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("report", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train loss first -> last" in res.stdout
    for name in ("loss.png", "lr.png", "throughput.png", "memory.png"):
        png = (out / "plots" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    report = (out / "report.md").read_text()
    assert "| status | finished |" in report and "plots/loss.png" in report
    # A run still going: no end record, and a half-written last line.
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(l for l in lines if '"end"' not in l) + '\n{"step": 7, "lo')
    res = run_cli("report", str(out))
    assert res.returncode == 0 and "running or stopped" in (out / "report.md").read_text()


@pytest.mark.parametrize("kind, checkpointing", [("full", False), ("lora", False), ("partial", False),
                                                 ("full", True), ("lora", True)])
def test_step_flops_per_method_match_a_flop_counter(kind, checkpointing):
    """The FLOPs MFU charges per token for full, LoRA and partial fine-tuning (and HFU, with activation
    checkpointing's recompute) against torch's FlopCounterMode on a real forward and backward of a tiny Llama:
    frozen weights get no weight gradients, blocks below the lowest trainable one pass no input gradients."""
    import peft
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_ft.distributed.activation_checkpointing import enable_activation_checkpointing
    from dist_ft.telemetry.flops import flops_per_token, method_flops, step_flops_per_token

    cfg = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")  # eager: attention as counted matmuls
    if kind == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
    elif kind == "partial":  # the last block and the head
        model.requires_grad_(False)
        for p in [*model.model.layers[-1].parameters(), *model.lm_head.parameters()]:
            p.requires_grad_(True)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops() / (B * T)
    model_flops, hardware_flops = step_flops_per_token(cfg, T, method_flops(model, cfg, recompute=checkpointing))
    assert (hardware_flops if checkpointing else model_flops) == pytest.approx(counted, rel=0.05)
    if kind == "full":
        assert model_flops == pytest.approx(flops_per_token(cfg, T))  # PaLM's 6 N + 12 L d T
    else:
        assert model_flops < 0.75 * flops_per_token(cfg, T)  # no weight gradients for the frozen matrices
