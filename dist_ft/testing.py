"""Tiny, randomly initialised model folders built from a config, for tests and benchmarks (no downloads).

    python -m dist_ft.testing /tmp/tiny-llama --arch llama
    python -m dist_ft.testing /tmp/llama-130m --arch llama --size 130m
    python -m dist_ft.testing /tmp/tiny-t5 --arch t5        # encoder-decoders: t5, bart (model.task: seq2seq_lm)
    python -m dist_ft.testing /tmp/tiny-vit --arch vit      # image classifiers: vit, resnet (image_classification)

Image classifiers get an image processor (preprocessor_config.json: resize to image_size, normalise to [-1, 1])
instead of a tokenizer, and a head over --num-labels classes (2 by default) named class_0, class_1, ...

The tokenizer is a small byte-level BPE trained in a second on CPython's own docs, with a ChatML chat template,
so that every data format (chat included) works against these models exactly as against a real one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (128, 4, 4, 2, 256),
    "mini": (256, 4, 4, 4, 1024),      # the t5-mini-random alias's encoder and decoder (assets.py)
    "130m": (768, 12, 12, 12, 2048),   # ~130M parameters with a 32k vocabulary, Llama-shaped
    "1.1b": (2048, 22, 32, 4, 5632),   # TinyLlama's dimensions
}


def make_tokenizer(out: Path, vocab_size: int = 512):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_model(out: str | Path, *, arch: str = "llama", size: str = "tiny", vocab_size: int | None = None,
               num_labels: int | None = None, seed: int = 0, tokenizer_from: str | Path | None = None,
               dropout: float = 0.0) -> Path:
    """Write a random model folder (config, safetensors weights, tokenizer) and return its path. `dropout`: an
    encoder-decoder's (T5 and BART have it on by default; off here, so that runs on any number of ranks can be
    compared step by step)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              AutoTokenizer, BartConfig, GPT2Config, LlamaConfig, Qwen2Config, T5Config)

    if arch in IMAGE_ARCHS:
        return make_image_model(out, arch=arch, size=size, num_labels=num_labels, seed=seed, dropout=dropout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        tok.save_pretrained(out)
    else:
        tok = make_tokenizer(out, vocab_size or 512)
    hidden, layers, heads, kv, inter = SIZES[size]
    vocab = max(vocab_size or 0, len(tok))
    common = dict(vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, use_cache=False)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                          tie_word_embeddings=size in ("tiny", "small"), **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                          tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=2048, **common)
    elif arch == "t5":  # T5's conventions: the decoder starts from the pad token; input and output embeddings tied
        cfg = T5Config(d_model=hidden, d_kv=hidden // heads, d_ff=inter, num_layers=layers, num_decoder_layers=layers,
                       num_heads=heads, relative_attention_num_buckets=16, decoder_start_token_id=tok.pad_token_id,
                       dropout_rate=dropout, **common)
    elif arch == "bart":  # BART's: the decoder starts from EOS
        cfg = BartConfig(d_model=hidden, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
                         decoder_attention_heads=heads, encoder_ffn_dim=inter, decoder_ffn_dim=inter,
                         max_position_embeddings=1024, decoder_start_token_id=tok.eos_token_id,
                         forced_eos_token_id=None, dropout=dropout, **common)
    else:
        raise ValueError(f"unknown arch {arch!r}: llama, qwen2, gpt2, t5 or bart")
    torch.manual_seed(seed)
    if arch in ("t5", "bart"):
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    elif num_labels:
        cfg.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


IMAGE_ARCHS = ("vit", "resnet")


def make_image_model(out: str | Path, *, arch: str = "vit", size: str = "tiny", num_labels: int | None = None,
                     image_size: int = 16, seed: int = 0, dropout: float = 0.0) -> Path:
    """A random image classifier folder: config, safetensors weights, and the image processor. ViT: patches of 4
    pixels, SIZES' hidden width, layers, heads and MLP width. ResNet: basic blocks, one per stage, a stage per
    layer of SIZES (widths 16, 32, 64, ...), a 16-wide stem."""
    import torch
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig
    from transformers import ViTImageProcessorPil  # (the plain ViTImageProcessor's torchvision backend is absent here)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hidden, layers, heads, _, inter = SIZES[size]
    n = num_labels or 2
    labels = {"id2label": {i: f"class_{i}" for i in range(n)}, "label2id": {f"class_{i}": i for i in range(n)}}
    if arch == "vit":
        cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, image_size=image_size, patch_size=4, num_channels=3,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **labels)
    elif arch == "resnet":
        cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16 * 2 ** i for i in range(layers)],
                           depths=[1] * layers, layer_type="basic", **labels)
    else:
        raise ValueError(f"unknown image arch {arch!r}: {' or '.join(IMAGE_ARCHS)}")
    torch.manual_seed(seed)
    AutoModelForImageClassification.from_config(cfg).save_pretrained(out, safe_serialization=True)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2", "t5", "bart", *IMAGE_ARCHS])
    p.add_argument("--size", default="tiny", choices=list(SIZES))
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--num-labels", type=int, default=None)
    a = p.parse_args(argv)
    print(make_model(a.out, arch=a.arch, size=a.size, vocab_size=a.vocab_size, num_labels=a.num_labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
