"""Row-range reads of a model folder's weights: right values, and no file left mapped (mapped pages count as the
reading process's resident memory: a handle kept open made every FSDP2 rank hold the pages of all it had read)."""

import gc
from pathlib import Path

import torch
from safetensors.torch import load_file

from dist_ft.weights import ModelWeights


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_rows_reads_slices_and_unmaps(tiny_llama):
    weights = ModelWeights(tiny_llama, seed=0)
    files = sorted(tiny_llama.glob("*.safetensors"))
    full = {k: v for f in files for k, v in load_file(f).items()}
    name, value = next((k, v.clone()) for k, v in full.items() if v.dim() == 2 and v.shape[0] >= 4)
    del full  # load_file's tensors are views of the mapped file: the test's own reference must not keep it mapped
    gc.collect()
    part = weights.rows(name, value.shape, 1, 3, torch.float32)
    assert torch.equal(part, value[1:3].float())
    assert not any(_mapped(f) for f in files)
    part.add_(1)  # the slice owns its memory: writing to it touches neither the file nor another read
    assert torch.equal(weights.rows(name, value.shape, 1, 3, torch.float32), value[1:3].float())


def test_seeded_lora_a_has_peft_and_torch_bound_for_linears_and_convolutions(tiny_llama):
    """The sharded paths' LoRA A (no rank holds peft's module to initialise it) is uniform within peft's default
    kaiming bound, 1/sqrt(fan_in) with fan_in as torch counts it: in_features, or in_channels x kernel area for a
    convolution's A (ResNet)."""
    import math

    w = ModelWeights(tiny_llama, seed=0)
    for shape in [(8, 512), (8, 64, 3, 3), (4, 16, 1, 1)]:
        t = w.new_value("base_model.model.layer.lora_A.default.weight", torch.Size(shape))
        reference = torch.empty(shape)
        torch.nn.init.kaiming_uniform_(reference, a=math.sqrt(5))  # peft's LoraLayer.reset_lora_parameters
        fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(reference)
        bound = 1 / math.sqrt(fan_in)
        assert reference.abs().max() <= bound + 1e-7
        assert t.abs().max() <= bound + 1e-7 and t.abs().max() > 0.9 * bound, (shape, float(t.abs().max()), bound)
