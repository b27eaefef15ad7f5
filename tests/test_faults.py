"""Faults during a run: a rank that stops answering ends the job within the collective timeout (no hang), and a
rank that crashes takes the job down with its error; neither leaves a final model behind."""

import time

from conftest import run_cli, tiny_recipe, write_recipe


def _recipe(tmp_path, model):
    out = tmp_path / "run"
    r = tiny_recipe(model, out, training={"max_steps": 6}, distributed={"timeout_seconds": 10})
    return out, write_recipe(tmp_path / "r.yaml", r)


def test_a_silent_rank_times_out_instead_of_hanging(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama)
    t0 = time.perf_counter()
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "hang:3:1"}, timeout=300)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    assert elapsed < 150, elapsed  # 10 s collective timeout plus start-up, far from a hang
    text = res.stdout + res.stderr
    assert "timed out" in text.lower() or "timeout" in text.lower(), text[-3000:]
    assert not (out / "final").exists()


def test_a_crashing_rank_takes_the_job_down(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "crash:2:1"}, timeout=300)
    assert res.returncode != 0 and "injected fault" in res.stdout + res.stderr
    assert not (out / "final").exists()
