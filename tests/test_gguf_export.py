"""GGUF export (issue 27): every file is read back with transformers' own GGUF loader
(`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`) and its logits compared with the model it came from.

Bounds: f16 within 1e-2 absolute; q8_0 within 5% of the largest |logit| (measured: 0.5% on the tiny models, 2.9% on
SmolLM2-135M, whose f16 file is exact). The real-model case is marked slow:

    .venv/bin/python -m pytest tests/test_gguf_export.py -q
    .venv/bin/python -m pytest tests/test_gguf_export.py -q -m slow      # SmolLM2-135M, 2-4 min on 2 cores
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli, tiny_recipe, write_recipe
from dist_ft.checkpoint.gguf_export import GGUFExportError, _permute, check_config, export_gguf, write_gguf
from dist_ft.cli import main

F16_ATOL = 1e-2
Q8_REL = 5e-2
TEXTS = ["The quick brown fox jumps over the lazy dog.", "  leading spaces\tand\nnewlines, 12345!",
         "naïve café, 中文", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


def _read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _max_diff(a, b, tok, texts=TEXTS[:2]) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) over a few prompts."""
    worst, scale = 0.0, 0.0
    for text in texts:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            la, lb = a(**ids).logits, b(**ids).logits
        worst, scale = max(worst, (la - lb).abs().max().item()), max(scale, la.abs().max().item())
    return worst, scale


def _metadata(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    wanted = ("general.architecture", "tokenizer.chat_template", "tokenizer.ggml.model", "tokenizer.ggml.pre")
    return {k: reader.fields[k].contents() for k in wanted if k in reader.fields}


def _assert_close(worst: float, scale: float, quant: str) -> None:
    if quant == "f16":
        assert worst <= F16_ATOL, worst
    else:
        assert worst <= Q8_REL * scale, (worst, scale)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_round_trip_logits_tokenizer_and_chat_template(tmp_path, tiny_llama, quant):
    out = tmp_path / f"tiny-{quant}.gguf"
    res = export_gguf(tiny_llama, out, quant=quant)
    assert res.path == out and res.arch == "llama" and not res.kept_f16
    source = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    loaded, loaded_tok = _read_back(out)
    _assert_close(*_max_diff(source, loaded, tok), quant)
    for text in TEXTS:
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"], text
    meta = _metadata(out)
    assert meta["tokenizer.chat_template"] == tok.chat_template and "<|im_start|>" in tok.chat_template
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt2"
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token) == (tok.bos_token, tok.eos_token,
                                                                                   tok.pad_token)
    assert res.modelfile.read_text().startswith(f"FROM ./{out.name}\n")


def _tiny_mistral(tok):
    from transformers import MistralConfig, MistralForCausalLM

    # head_dim 32 with 4 heads of a 64-wide model: heads wider than hidden/heads, as Mistral-Nemo has
    cfg = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, intermediate_size=128, vocab_size=len(tok), sliding_window=None,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    return MistralForCausalLM(cfg).eval()


def _tiny_qwen2(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases, so that a bias read back wrong would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_shapes(tmp_path, tiny_llama, tiny_qwen2, arch):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = _tiny_qwen2(tiny_qwen2) if arch == "qwen2" else _tiny_mistral(tok)
    out = tmp_path / f"{arch}.gguf"  # "mistral.gguf": also checks the general.name that transformers would misread
    write_gguf(model, tok, out, quant="f16")
    loaded, _ = _read_back(out)
    assert type(loaded).__name__ == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    worst, _ = _max_diff(model, loaded, tok)
    assert worst <= F16_ATOL, worst


def test_q_and_k_rows_are_stored_in_llama_cpp_order(tmp_path, tiny_llama, tiny_qwen2):
    """Llama's q/k rows are reordered for llama.cpp's rotary layout (the loader undoes it); Qwen2's are not."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for path, permuted in ((tiny_llama, True), (tiny_qwen2, False)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out = write_gguf(model, tok, tmp_path / f"{path.name}.gguf", quant="f32").path
        stored = {t.name: t.data for t in gguf.GGUFReader(str(out)).tensors}
        cfg = model.config
        for proj, heads in (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads)):
            hf = getattr(model.model.layers[0].self_attn, f"{proj}_proj").weight.detach().numpy()
            want = _permute(hf, heads) if permuted else hf
            assert (stored[f"blk.0.attn_{proj}.weight"] == want).all(), (path.name, proj)
            assert permuted == (not (stored[f"blk.0.attn_{proj}.weight"] == hf).all())


def _sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: BPE over Metaspace ("▁") with 256 byte-fallback tokens, <unk>/<s>/</s>."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    bpe.train_from_iterator(list(topics.values())[:200], trainers.BpeTrainer(vocab_size=600, show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
    return tok


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _sentencepiece_style_tokenizer()
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok) + 4, tie_word_embeddings=False)  # a padded vocab
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    out = write_gguf(model, tok, tmp_path / "spm.gguf", quant="f16").path
    loaded, loaded_tok = _read_back(out)
    meta = _metadata(out)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.chat_template"] == tok.chat_template
    for text in TEXTS[:3] + ["x\n\ny"]:
        assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert _max_diff(model, loaded, tok)[0] <= F16_ATOL


def test_lora_run_is_merged_then_exported(tmp_path, tiny_llama, capsys):
    """`dist-ft export RUN OUT.gguf --format gguf` on a LoRA run: the file holds base + adapter, merged."""
    from peft import PeftModel

    run = tmp_path / "lora"
    recipe = tiny_recipe(tiny_llama, run, method={"kind": "lora", "lora": {"r": 4}}, training={"max_steps": 3})
    res = run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "tuned.gguf"
    assert main(["export", str(run), str(out), "--format", "gguf", "--quant", "f16"]) == 0
    printed = capsys.readouterr().out
    assert f"llama-cli -m {out}" in printed and "ollama create tuned -f tuned.Modelfile" in printed
    assert (tmp_path / "tuned.Modelfile").read_text().startswith("FROM ./tuned.gguf\n")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    loaded, _ = _read_back(out)
    assert _max_diff(base, loaded, tok)[0] > 1e-4  # the adapter is in the file
    merged = PeftModel.from_pretrained(base, run / "final").merge_and_unload().eval()
    assert _max_diff(merged, loaded, tok)[0] <= F16_ATOL
    assert main(["export", str(run), str(out), "--format", "gguf"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_unsupported_requests_are_refused_before_any_work(tmp_path, capsys):
    from dist_ft.testing import make_model

    gpt2 = make_model(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(GGUFExportError, match=r"model_type 'gpt2' .*supported: llama, mistral, qwen2"):
        export_gguf(gpt2, tmp_path / "a.gguf")
    with pytest.raises(GGUFExportError, match=r"--quant: 'q4_k_m' .*f16, bf16, q8_0"):
        export_gguf(gpt2, tmp_path / "b.gguf", quant="q4_k_m")
    with pytest.raises(GGUFExportError, match=r"\.gguf"):
        export_gguf(gpt2, tmp_path / "c")
    assert not list(tmp_path.glob("*.gguf*"))
    with pytest.raises(GGUFExportError, match=r"rope_scaling type 'llama3'.*supported: none"):
        check_config({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(GGUFExportError, match=r"architectures.*ForCausalLM"):
        check_config({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    assert main(["export", str(gpt2), str(tmp_path / "d.gguf"), "--format", "gguf", "--dtype", "bf16"]) == 2
    assert "--dtype applies to --format hf" in capsys.readouterr().err
    assert main(["export", str(gpt2), str(tmp_path / "e.gguf"), "--format", "gguf"]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err and not list(tmp_path.glob("*.gguf*"))


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_f16_and_q8_0(tmp_path):
    """The bundled SmolLM2-135M-Instruct: f16 reads back exactly (its weights are bf16), q8_0 within the bound."""
    from dist_ft.assets import alias_available, resolve_model_path

    why = alias_available("smollm2-135m-instruct")
    if why:
        pytest.skip(why)
    src = resolve_model_path("smollm2-135m-instruct")
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    prompts = ["The capital of France is", "<|im_start|>user\nWhat is a noun?<|im_end|>\n<|im_start|>assistant\n"]
    for quant in ("f16", "q8_0"):
        out = export_gguf(src, tmp_path / f"smollm2-{quant}.gguf", quant=quant).path
        loaded, loaded_tok = _read_back(out)
        _assert_close(*_max_diff(source, loaded, tok, prompts), quant)
        for text in prompts:  # and the same greedy choice at every position (measured for q8_0 too)
            ids = tok(text, return_tensors="pt")
            with torch.no_grad():
                assert torch.equal(source(**ids).logits.argmax(-1), loaded(**ids).logits.argmax(-1)), (quant, text)
        for text in TEXTS + prompts:
            assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"], text
        assert _metadata(out)["tokenizer.chat_template"] == tok.chat_template
        del loaded
