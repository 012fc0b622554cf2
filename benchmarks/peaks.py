"""Nominal peak FLOP/s per device kind, for MFU (model FLOPs utilisation).

Matched on `jax.devices()[0].device_kind` with anchored patterns, so a device that is not in
the table (or a cut-down variant with a similar name) gets no peak and an MFU of None, never a
number measured against another device's peak.

Figures are the vendors' dense (no 2:4 sparsity) per-chip peaks in TFLOP/s. Three columns:
  bf16      bfloat16 tensor-core / MXU peak.
  f32_fast  float32 at JAX's default matmul precision, which lets XLA compute float32 dots and
            convolutions with TF32 tensor cores (NVIDIA Ampere and later) or one bfloat16 MXU
            pass (TPU): the TF32 peak on those GPUs, the bf16 peak on TPUs.
  f32       true float32 (precision 'highest' / 'float32'): the GPUs' non-tensor FP32 peak;
            not published for TPUs (None).
The datasheets print the sparse figure for TF32/BF16 with an asterisk; the dense one is half.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's nominal peaks (TFLOP/s, None where unpublished) and where they come from."""

    name: str
    bf16: float | None
    f32_fast: float | None
    f32: float | None
    source: str


# Issue #8's figure for the 2-core development machine (float32 FMA); every run of the suite
# on CPU also measures a 2048^3 matmul (`common.measure_matmul_gflops`) as the practical ceiling.
CPU = Peak("CPU", 0.19, 0.19, 0.19, "issue #8: 190 GFLOP/s, 2 cores, float32 FMA")

_H100_SXM = Peak(
    "NVIDIA H100 SXM",
    989.5,
    494.5,
    67.0,
    "NVIDIA H100 Tensor Core GPU Datasheet (SXM): BF16 1,979*, TF32 989*, FP32 67 TFLOPS",
)
_H100_PCIE = Peak(
    "NVIDIA H100 PCIe",
    756.5,
    378.0,
    51.0,
    "NVIDIA H100 Tensor Core GPU Datasheet (PCIe): BF16 1,513*, TF32 756*, FP32 51 TFLOPS",
)
_H100_NVL = Peak(
    "NVIDIA H100 NVL",
    835.5,
    417.5,
    60.0,
    "NVIDIA H100 Tensor Core GPU Datasheet (NVL): BF16 1,671*, TF32 835*, FP32 60 TFLOPS",
)
_H200_SXM = Peak(
    "NVIDIA H200 SXM",
    989.5,
    494.5,
    67.0,
    "NVIDIA H200 Tensor Core GPU Datasheet (SXM): BF16 1,979*, TF32 989*, FP32 67 TFLOPS",
)
_H200_NVL = Peak(
    "NVIDIA H200 NVL",
    835.5,
    417.5,
    60.0,
    "NVIDIA H200 Tensor Core GPU Datasheet (NVL): BF16 1,671*, TF32 835*, FP32 60 TFLOPS",
)
_A100 = Peak(  # 40GB and 80GB, SXM4 and PCIe: the same compute peaks
    "NVIDIA A100",
    312.0,
    156.0,
    19.5,
    "NVIDIA A100 Tensor Core GPU Datasheet: BF16 312 (624*), TF32 156 (312*), FP32 19.5 TFLOPS",
)
_L4 = Peak(
    "NVIDIA L4",
    121.0,
    60.0,
    30.3,
    "NVIDIA L4 Tensor Core GPU Datasheet: BF16 242*, TF32 120*, FP32 30.3 TFLOPS",
)


def _tpu(name: str, bf16: float, page: str) -> Peak:
    # JAX's default precision runs float32 matmuls as one bf16 MXU pass (f32_fast = bf16);
    # Google publishes no true-float32 figure.
    return Peak(
        name, bf16, bf16, None, f"Google Cloud TPU docs, {page}: peak compute per chip (bf16)"
    )


# (device_kind pattern, peak), tried in order; `re.fullmatch` on the lower-cased kind.
TABLE: tuple[tuple[str, Peak], ...] = (
    ("cpu", CPU),
    (r"nvidia h100 pcie", _H100_PCIE),
    (r"nvidia h100 nvl", _H100_NVL),
    # SXM5 boards report e.g. 'NVIDIA H100 80GB HBM3'.
    (r"nvidia h100( sxm5?)?( \d+gb)?( hbm3e?)?", _H100_SXM),
    (r"nvidia h200 nvl", _H200_NVL),
    (r"nvidia h200( sxm5?)?( \d+gb)?( hbm3e)?", _H200_SXM),
    # 'NVIDIA A100-SXM4-40GB', 'NVIDIA A100-SXM4-80GB', 'NVIDIA A100-PCIE-40GB',
    # 'NVIDIA A100 80GB PCIe'.
    (r"nvidia a100-(sxm4|pcie)-(40|80)gb", _A100),
    (r"nvidia a100 (40|80)gb (pcie|sxm4?)", _A100),
    (r"nvidia l4", _L4),
    (r"tpu v4", _tpu("TPU v4", 275.0, "TPU v4")),
    (r"tpu v5 ?(lite|e)", _tpu("TPU v5e", 197.0, "TPU v5e")),
    (r"tpu v5p?", _tpu("TPU v5p", 459.0, "TPU v5p")),
    (r"tpu v6 ?(lite|e)", _tpu("TPU v6e", 918.0, "TPU v6e (Trillium)")),
)

# jax_default_matmul_precision values that ask for true float32 dots.
_FULL_F32_PRECISIONS = {"highest", "float32", "f32_f32_f32"}


def lookup(device_kind: str) -> Peak | None:
    """The table's entry for a `device_kind` string, or None for a device it does not know."""
    kind = " ".join(device_kind.lower().split())
    for pattern, peak in TABLE:
        if re.fullmatch(pattern, kind):
            return peak
    return None


def peak_tflops(
    device_kind: str, dtype: str, precision: str | None = None
) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, a description) for a compute dtype ('float32' / 'bfloat16') and
    jax_default_matmul_precision (None: JAX's default)."""
    peak = lookup(device_kind)
    if peak is None:
        return None, f"unknown device {device_kind!r}: no peak, MFU unknown"
    if dtype == "bfloat16":
        value, column = peak.bf16, "bf16"
    elif dtype == "float32" and str(precision).lower() in _FULL_F32_PRECISIONS:
        value, column = peak.f32, "f32"
    elif dtype == "float32":
        value, column = peak.f32_fast, "f32 at default precision"
    else:
        value, column = None, dtype
    if value is None:
        return None, f"{peak.name}: no published {column} peak, MFU unknown"
    return value, f"{peak.name} {column} {value:g} TFLOP/s ({peak.source})"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the nominal peak (TFLOP/s); None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)


def device_peak(dtype: str) -> tuple[float | None, str]:
    """`peak_tflops` for the first local device and the current default matmul precision."""
    import jax

    precision = getattr(jax.config, "jax_default_matmul_precision", None)
    return peak_tflops(jax.devices()[0].device_kind, dtype, precision)
