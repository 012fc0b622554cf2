"""The per-device peak table of the benchmarks: lookup by device_kind, and MFU from it."""

from __future__ import annotations

import pytest

from benchmarks import peaks


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("cpu", "CPU"),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100"),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
        ("NVIDIA A100-PCIE-40GB", "NVIDIA A100"),
        ("NVIDIA A100 80GB PCIe", "NVIDIA A100"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5e", "TPU v5e"),
        ("TPU v5p", "TPU v5p"),
        ("TPU v5", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e"),
    ],
)
def test_lookup_known_kinds(kind: str, name: str) -> None:
    peak = peaks.lookup(kind)
    assert peak is not None and peak.name == name
    assert peak.source  # every figure says where it comes from


@pytest.mark.parametrize(
    "kind",
    [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA A100X",
        "NVIDIA L40S",
        "TPU v7x",
        "NVIDIA H100 MIG 1g.10gb",
    ],
)
def test_unknown_kinds_have_no_peak_and_no_mfu(kind: str) -> None:
    assert peaks.lookup(kind) is None
    for dtype in ("float32", "bfloat16"):
        value, description = peaks.peak_tflops(kind, dtype)
        assert value is None and "unknown" in description
        assert peaks.mfu(1e12, 1.0, value) is None


def test_datasheet_figures_by_dtype_and_precision() -> None:
    h100 = "NVIDIA H100 80GB HBM3"
    assert peaks.peak_tflops(h100, "bfloat16")[0] == 989.5
    # JAX's default precision runs float32 dots on TF32 tensor cores; 'highest' on CUDA cores.
    assert peaks.peak_tflops(h100, "float32")[0] == 494.5
    assert peaks.peak_tflops(h100, "float32", "highest")[0] == 67.0
    assert peaks.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312.0
    assert peaks.peak_tflops("NVIDIA L4", "bfloat16")[0] == 121.0
    assert peaks.peak_tflops("TPU v6 lite", "bfloat16")[0] == 918.0
    # TPUs: float32 at default precision is one bf16 pass; no published true-float32 figure.
    assert peaks.peak_tflops("TPU v5 lite", "float32")[0] == 197.0
    assert peaks.peak_tflops("TPU v5 lite", "float32", "highest")[0] is None
    # The CPU keeps the suite's 190 GFLOP/s.
    assert peaks.peak_tflops("cpu", "float32")[0] == pytest.approx(0.19)


def test_gpus_no_longer_get_the_cpu_peak() -> None:
    for kind in ("NVIDIA H200", "NVIDIA A100-SXM4-40GB", "NVIDIA L4", "NVIDIA H100 PCIe"):
        for dtype in ("float32", "bfloat16"):
            value = peaks.peak_tflops(kind, dtype)[0]
            assert value is not None and value > 10.0


def test_mfu_is_achieved_over_the_table_peak() -> None:
    peak = peaks.peak_tflops("NVIDIA H200", "bfloat16")[0]
    assert peaks.mfu(989.5e12 / 2, 1.0, peak) == pytest.approx(0.5)
    assert peaks.mfu(1.0, 0.0, peak) is None


def test_suite_records_mfu_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import run

    monkeypatch.setattr(peaks, "device_peak", lambda dtype: peaks.peak_tflops("TPU v4", dtype))
    record = run._finish({"dtype": "bfloat16"}, [2.0], 275e12, items=8, matmul_gflops=None)
    assert record["mfu"] == pytest.approx(0.5)
    assert "TPU v4" in record["mfu_peak"]

    monkeypatch.setattr(peaks, "device_peak", lambda dtype: peaks.peak_tflops("NPU 9", dtype))
    record = run._finish({"dtype": "float32"}, [2.0], 275e12, items=8, matmul_gflops=None)
    assert record["mfu"] is None
