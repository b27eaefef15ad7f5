"""Loading is safe: a crafted pickle inside a checkpoint is refused before it can run, whichever library reads it.

Each payload, if unpickled, creates a marker file: so "refused" is checked both by the error and by the marker
never appearing, and the opt-in (`allow`) shows the payload was real.
"""

import json
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import run_cli, tiny_recipe, write_recipe
from dist_ft import safe_load
from dist_ft.distributed import dcp_state


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_plain_pickle_refused_and_opt_in_per_file(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / ".metadata"
    path.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(safe_load.UnsafePickleError) as err:
        safe_load.load_dcp_metadata(path)
    assert str(path) in str(err.value) and "checkpoint.allow_pickle" in str(err.value)
    assert not marker.exists()
    safe_load.load_dcp_metadata(path, allow=[str(path)])  # the user vouches for this one file
    assert marker.exists()


def test_torch_file_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": Payload(marker)}, path)
    with pytest.raises(safe_load.UnsafePickleError, match="mp_rank_00_model_states.pt"):
        safe_load.load_weights_only(path)
    with pytest.raises(safe_load.UnsafePickleError):
        with safe_load.deepspeed_loads_weights_only():
            torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed calls
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, ok)
    with safe_load.deepspeed_loads_weights_only():
        assert torch.load(ok, map_location="cpu", weights_only=False)["step"] == 3


def test_dcp_metadata_read_safely(tmp_path):
    """A real DCP folder reads through the allowlist; the same folder with a crafted `.metadata` is refused."""
    folder = tmp_path / "state"
    dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}}, checkpoint_id=str(folder),
             no_dist=True)
    got = dcp_state.read_model_tensors(folder)
    assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3))
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(safe_load.UnsafePickleError, match=r"\.metadata"):
        dcp_state.read_model_tensors(folder)
    assert not marker.exists()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_resume_from_a_tampered_checkpoint_is_refused(tmp_path, tiny_llama, strategy):
    """Someone swaps a state file for a crafted one and fixes the manifest's checksum to match: the resume fails
    loudly, names the file, and nothing in it runs."""
    out = tmp_path / "run"
    r = tiny_recipe(tiny_llama, out, training={"max_steps": 4, "stop_after_steps": 2},
                    distributed={"strategy": strategy}, checkpoint={"every_steps": 2})
    path = write_recipe(tmp_path / "r.yaml", r)
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-00000002"
    marker = tmp_path / "ran"
    if strategy == "ddp":
        victim = ckpt / "state" / ".metadata"
        victim.write_bytes(pickle.dumps(Payload(marker)))
    else:
        (victim,) = (ckpt / "state").rglob("mp_rank_00_model_states.pt")
        torch.save({"module": Payload(marker)}, victim)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    rel = str(victim.relative_to(ckpt))
    manifest["files"][rel] = {"bytes": victim.stat().st_size, "sha256": _sha256(victim)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    res = run_cli("train", str(path), "checkpoint.resume=auto", "training.stop_after_steps=null")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "refused to unpickle" in text and victim.name in text, text[-3000:]
    assert not marker.exists()
    assert not (out / "final").exists()  # it did not quietly start from the base model


def test_remote_code_runs_only_when_the_recipe_says_so(tmp_path, tiny_llama):
    """A model folder that ships its own Python (config.json `auto_map`): its code never runs by default; with
    `model.trust_remote_code: true` it does (which shows the folder's code was really there to run)."""
    import shutil

    model = tmp_path / "model-with-code"
    shutil.copytree(tiny_llama, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    for trust in (False, True):
        out = tmp_path / f"run-{trust}"
        path = write_recipe(tmp_path / f"r-{trust}.yaml",
                            tiny_recipe(model, out, training={"max_steps": 1}, model={"trust_remote_code": trust}))
        res = run_cli("train", str(path))
        assert marker.exists() is trust, (trust, res.stdout[-1500:] + res.stderr[-1500:])
        if not trust:
            assert res.returncode == 0, res.stderr[-3000:]  # the built-in Llama classes load it without the code
