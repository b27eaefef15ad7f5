"""Shared fixtures: tiny random models built from a config (no downloads), small data files, and a helper that
runs the real CLI in subprocesses (several ranks through `dist-ft launch`, i.e. torchrun, on gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.device_count() >= 1:
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs (run on a GPU box: bash scripts/test.sh -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _gpu_cases_by_test(items) -> str:
    counts: dict[str, int] = {}
    for item in items:
        name = item.originalname if hasattr(item, "originalname") else item.name
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


def pytest_report_collectionfinish(config, start_path, items):
    """One line naming the GPU matrix this run would run, and whether it will (after -m/-k selection)."""
    cases = [i for i in items if "gpu" in i.keywords]
    if not cases:
        return []
    gpus = torch.cuda.device_count()
    if gpus == 0:
        return [f"GPU matrix: no CUDA GPU here, skipping all {len(cases)} cases it would run: "
                f"{_gpu_cases_by_test(cases)}"]
    return [f"GPU matrix: {len(cases)} cases on {gpus} x {torch.cuda.get_device_name(0)}: {_gpu_cases_by_test(cases)}"]


_GPU_OUTCOMES: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if "gpu" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        # A skip comes from setup (the CPU-box marker) or from the call (a case needing more GPUs or flash-attn).
        _GPU_OUTCOMES[report.nodeid] = "skipped" if report.skipped else ("passed" if report.passed else "failed")
    elif report.when == "teardown" and report.failed:
        _GPU_OUTCOMES[report.nodeid] = "failed"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many GPU cases ran and how many were skipped: a 1-GPU box must not pass by skipping."""
    if not _GPU_OUTCOMES:
        return
    n = {k: sum(1 for v in _GPU_OUTCOMES.values() if v == k) for k in ("passed", "failed", "skipped")}
    terminalreporter.write_line(f"GPU matrix: {n['passed'] + n['failed']} cases ran ({n['passed']} passed, "
                                f"{n['failed']} failed), {n['skipped']} skipped, on {torch.cuda.device_count()} GPU(s)")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from dist_ft.testing import make_model
    return make_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_llama) -> Path:
    from dist_ft.testing import make_model
    return make_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", tokenizer_from=tiny_llama)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, tiny_llama) -> Path:
    from dist_ft.testing import make_model
    return make_model(tmp_path_factory.mktemp("models") / "tiny-cls", arch="llama", num_labels=3,
                      tokenizer_from=tiny_llama)


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from dist_ft.model import load_tokenizer
    return load_tokenizer(tiny_llama)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


# Recognisable fake secrets: launch tests put them in the environment and then scan every file the launch wrote
# (working directory, run directory, $HOME) and its output, since launchers copy environments into files
# (accelerate's and DeepSpeed's multi-node `.deepspeed_env`) and logs.
FAKE_SECRETS = {"WANDB_API_KEY": "fakeWandbKey0123456789abcdef0123456789abcd",
                "HF_TOKEN": "hf_fakeTokenQ9x8w7v6u5t4s3r2q1p0",
                "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret/K7MDENGbPxRfiCYEXAMPLEKEY"}


def secret_leaks(*roots: Path, outputs: tuple[str, ...] = ()) -> list[str]:
    """Files under `roots` (and captured outputs) that hold any FAKE_SECRETS value; empty when none."""
    needles = [v.encode() for v in FAKE_SECRETS.values()]
    hits = [f"output #{i}" for i, text in enumerate(outputs) if any(n.decode() in text for n in needles)]
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and any(n in path.read_bytes() for n in needles):
                hits.append(str(path))
    return hits


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dist_ft", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def read_final(run_dir: Path) -> dict:
    """Every tensor of a run's final/: the adapter, or the model from all its safetensors files (a full fine-tune's
    final/ is written one unit per file, with an index)."""
    from safetensors.torch import load_file
    final = Path(run_dir) / "final"
    if (final / "adapter_model.safetensors").exists():
        return load_file(final / "adapter_model.safetensors")
    files = sorted(final.glob("model*.safetensors"))
    assert files, f"no weights in {final}"
    return {k: v for f in files for k, v in load_file(f).items()}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def tiny_recipe(model_path: Path, out: Path, **sections) -> dict:
    """A small causal-LM recipe over the fortunes built-in; sections override per key."""
    recipe = {
        "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_path)},
        "data": {"train": "builtin:fortunes", "format": "text", "max_length": 48, "max_train_samples": 256,
                 "max_eval_samples": 24},
        "method": {"kind": "full"},
        "training": {"max_steps": 6, "micro_batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0,
                     "lr_scheduler": "linear"},
        "distributed": {"strategy": "ddp", "precision": "fp32", "threads_per_process": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (needs root and mount rights; skipped where the machine has neither)."""
    mounted = []

    def make(name: str, kib: int) -> Path:
        path = tmp_path / name
        path.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
