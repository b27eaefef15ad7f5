"""GPU peak FLOP/s by exact device name (issue 21, item 11): the table was matched by substring, so "NVIDIA L40"
took the L4's figures and an H100 PCIe or NVL the SXM part's, and MFU was off by 30-50%. The names are what
`torch.cuda.get_device_name()` reports; the figures are the vendors' dense (not sparse) tensor-core peaks."""

import pytest

from dist_ft.telemetry.flops import gpu_peak, gpu_peaks

T = 1e12
# (device name, bf16, fp16, fp32/TF32) from the vendors' datasheets, dense.
CASES = [
    ("NVIDIA A100-SXM4-80GB", 312, 312, 156),
    ("NVIDIA A100-SXM4-40GB", 312, 312, 156),
    ("NVIDIA A100-PCIE-40GB", 312, 312, 156),
    ("NVIDIA A100 80GB PCIe", 312, 312, 156),
    ("NVIDIA H100 80GB HBM3", 989, 989, 494),
    ("NVIDIA H100 PCIe", 756, 756, 378),
    ("NVIDIA H100 NVL", 835, 835, 417.5),
    ("NVIDIA H200", 989, 989, 494),
    ("NVIDIA H200 NVL", 835, 835, 417.5),
    ("NVIDIA L4", 121, 121, 60),
    ("NVIDIA L40S", 362.05, 362.05, 183),
    ("NVIDIA L40", 181.05, 181.05, 90.5),
    ("NVIDIA A10", 125, 125, 62.5),
    ("NVIDIA GeForce RTX 4090", 165.2, 165.2, 82.6),
    ("Tesla V100-SXM2-32GB", None, 125, 15.7),
    ("Tesla V100-PCIE-16GB", None, 112, 14),
    ("Tesla T4", None, 65, 8.1),
]


@pytest.mark.parametrize("name,bf16,fp16,fp32", CASES, ids=[c[0] for c in CASES])
def test_peak_by_exact_device_name(name, bf16, fp16, fp32):
    peaks = gpu_peaks(name)
    assert peaks is not None, name
    for dtype, want in (("bf16", bf16), ("fp16", fp16), ("fp32", fp32)):
        got = gpu_peak(name, dtype)
        assert got == (want * T if want is not None else None), (name, dtype, got)


def test_names_that_share_a_prefix_are_different_gpus():
    assert gpu_peak("NVIDIA L40", "bf16") != gpu_peak("NVIDIA L4", "bf16")
    assert gpu_peak("NVIDIA L40S", "bf16") != gpu_peak("NVIDIA L40", "bf16")
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") < gpu_peak("NVIDIA H100 NVL", "bf16") < gpu_peak(
        "NVIDIA H100 80GB HBM3", "bf16")
    assert gpu_peak("NVIDIA A10", "bf16") != gpu_peak("NVIDIA A100-SXM4-80GB", "bf16")


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 3090", "NVIDIA H100", "NVIDIA L4 (MIG 1g.6gb)",
                                  "NVIDIA B200", "AMD Instinct MI300X", "", "NVIDIA A100-SXM4-80GB MIG 3g.40gb"])
def test_unknown_or_ambiguous_names_give_no_peak(name):
    """No figure rather than a neighbour's: MFU is then not reported (device_peak says the name is not in the
    table). A bare "NVIDIA H100" could be any of three parts; a MIG slice has a fraction of the GPU."""
    assert gpu_peaks(name) is None and gpu_peak(name, "bf16") is None


def test_case_and_spacing_do_not_matter_and_plan_names_resolve():
    assert gpu_peak(" nvidia  l40s ", "bf16") == 362.05 * T
    # `dist-ft plan --gpu` names (plan.GPU_MEMORY_GIB keys) stand for one part each.
    from dist_ft.plan import GPU_MEMORY_GIB
    for key in GPU_MEMORY_GIB:
        assert gpu_peaks(key) is not None, key
    assert gpu_peak("H100", "bf16") == 989 * T and gpu_peak("L4", "bf16") == 121 * T


def test_device_peak_names_an_unknown_gpu(monkeypatch):
    import torch

    from dist_ft.telemetry import flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert flops.device_peak(torch.device("cuda", 0), "bf16") == (181.05 * T, "NVIDIA L40 datasheet")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    peak, source = flops.device_peak(torch.device("cuda", 0), "bf16")
    assert peak is None and "not in the table" in source


def test_the_cpu_probe_times_the_compute_dtype():
    """A bf16 run's MFU is against the bf16 matmul's rate. On a CPU with bf16 matrix instructions that rate is above
    the fp32 one, which the probe measured for every run before, over-stating a bf16 run's MFU."""
    import torch

    from dist_ft.telemetry import flops
    if "avx512_bf16" not in open("/proc/cpuinfo").read() and "amx_bf16" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no bf16 matrix instructions")
    fp32 = flops.measured_cpu_peak(threads=1, size=768, dtype="fp32")
    bf16 = flops.measured_cpu_peak(threads=1, size=768, dtype="bf16")
    assert bf16 > 1.2 * fp32, (bf16 / 1e9, fp32 / 1e9)
    peak, source = flops.device_peak(torch.device("cpu"), "bf16")
    assert source == "measured bf16 matmul on this CPU process" and peak > 0
