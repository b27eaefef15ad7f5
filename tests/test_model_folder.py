"""The model folder is checked against the recipe before any work (dist_ft/model_folder.py, through preflight):
token ids within the embedding rows, the special tokens the format needs, data.max_length within the positions.

    .venv/bin/python -m pytest tests/test_model_folder.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dist_ft.config import recipe_from_dict
from dist_ft.model_folder import model_folder_problems
from dist_ft.preflight import model_problems

from conftest import run_cli, tiny_recipe, write_jsonl, write_recipe


def _recipe(model: Path | str, tmp_path: Path, **data) -> object:
    task = "sequence_classification" if data.get("format") == "classification" else "causal_lm"
    return recipe_from_dict({"output_dir": str(tmp_path / "out"), "model": {"path": str(model), "task": task},
                             "data": {"train": "builtin:fortunes", "format": "text", **data}})


@pytest.fixture(scope="module")
def grown_tokenizer(tiny_llama, tmp_path_factory) -> Path:
    """A tiny model folder whose tokenizer gained a token its 512-row embedding has no row for."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("models") / "grown"
    shutil.copytree(tiny_llama, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(folder)
    assert len(tok) == 513 and json.loads((folder / "config.json").read_text())["vocab_size"] == 512
    return folder


def test_tokenizer_ids_beyond_the_embedding_are_refused_with_the_fix(grown_tokenizer, tmp_path):
    (problem,) = model_problems(_recipe(grown_tokenizer, tmp_path))
    assert "the tokenizer has 513 tokens" in problem and "id 512" in problem and "512 rows" in problem
    assert "use the tokenizer saved with the model, or resize the embedding to 513 rows" in problem


def test_an_eos_or_pad_beyond_the_embedding_is_refused(tiny_llama, tmp_path):
    """The ids the data pipeline appends count too, even when the vocabulary fits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = len(tok)
    tok.add_special_tokens({"eos_token": "<|my_eos|>"})  # id 512: beyond the 512 rows
    (problem,) = model_folder_problems(_recipe(tiny_llama, tmp_path), tok)
    assert f"EOS token ('<|my_eos|>', appended by the data pipeline) is id {rows}" in problem
    assert f"{rows} rows" in problem


def test_check_and_train_refuse_the_folder_before_any_model_is_built(grown_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample {i}"} for i in range(20)])
    recipe = tiny_recipe(grown_tokenizer, tmp_path / "run", data={"train": str(data), "format": "text"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    check = run_cli("check", str(path), timeout=300)
    assert check.returncode == 2, check.stderr
    assert "the tokenizer has 513 tokens" in check.stderr and "512 rows" in check.stderr
    train = run_cli("train", str(path), timeout=300)
    assert train.returncode == 2, train.stdout + train.stderr
    assert "the tokenizer has 513 tokens" in train.stderr
    assert "IndexError" not in train.stderr and "Traceback" not in train.stderr
    assert "[weights]" not in train.stdout and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_max_length_beyond_the_positions_is_refused(tiny_llama, tmp_path):
    (problem,) = model_problems(_recipe(tiny_llama, tmp_path, max_length=4096))
    assert problem.startswith("data.max_length: 4096 is beyond the model's 2048 positions")
    assert "set data.max_length: 2048 or less" in problem
    assert model_problems(_recipe(tiny_llama, tmp_path, max_length=2048)) == []


def test_chat_data_needs_a_chat_template_that_renders(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    for fmt in ("chat", "sharegpt"):
        (problem,) = model_folder_problems(_recipe(tiny_llama, tmp_path, format=fmt), tok)
        assert f"data.format: {fmt} renders conversations through the tokenizer's chat template" in problem
    # instruction data is rendered without a template when there is none: nothing to refuse
    assert model_folder_problems(_recipe(tiny_llama, tmp_path, format="instruction"), tok) == []
    tok.chat_template = "{{ raise_exception('only system turns') }}"
    (problem,) = model_folder_problems(_recipe(tiny_llama, tmp_path, format="chat"), tok)
    assert "chat template cannot render a user turn and an assistant turn" in problem


def test_a_causal_lm_needs_an_eos(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.eos_token = None
    (problem,) = model_folder_problems(_recipe(tiny_llama, tmp_path), tok)
    assert "the tokenizer has no EOS token" in problem and "eos_token" in problem


def test_the_tiny_folders_pass(tiny_llama, tiny_qwen2, tiny_classifier, tmp_path):
    for folder in (tiny_llama, tiny_qwen2):
        for fmt in ("text", "instruction", "alpaca", "chat", "sharegpt"):
            assert model_problems(_recipe(folder, tmp_path, format=fmt, max_length=2048)) == []
    assert model_problems(_recipe(tiny_classifier, tmp_path, format="classification")) == []


@pytest.mark.parametrize("alias, fmt", [("smollm2-135m-instruct", "chat"), ("minilm-l6-v2", "classification")])
def test_the_bundled_aliases_pass_with_their_real_tokenizers(alias, fmt, tmp_path):
    from dist_ft.assets import alias_available
    from dist_ft.model_folder import _folder

    recipe = _recipe(alias, tmp_path, format=fmt, max_length=256)
    if alias_available(alias) or _folder(recipe) is None:
        pytest.skip(f"{alias} is not installed (or not converted yet) here")
    assert model_problems(recipe) == []
    # and the check does read that folder: a max_length beyond its positions is refused
    (problem,) = model_problems(_recipe(alias, tmp_path, format=fmt, max_length=100_000))
    assert "is beyond the model's" in problem
