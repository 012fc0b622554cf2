"""Compiler options of the runner's jits: which ops XLA:CPU hands to YNNPACK (`xla.*`).

jax 0.10's XLA:CPU compiles matmuls, convolutions and reductions to calls into the YNNPACK
library; whatever is not handed over runs on XLA's own kernels (Eigen convolutions and
matmuls, generated loops). Which is faster depends on the network and the CPU: on the
development CPU, XLA's own convolutions train the U-Nets faster than YNNPACK's (its
kernel-gradient convolutions are the slow part), YNNPACK's reductions help the CIFAR-10 U-Net
and hurt the small digits one, whose hundreds of tiny reductions each pay a library call.
`benchmarks.ynnpack_ops` measures every routing on a config; docs/performance.md has the
tables behind each config's value. A routing changes float32 rounding only (another kernel,
another summation order), never the function computed. Other backends ignore the key.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from diffusion_jax.errors import ConfigError

# `xla.cpu_ynnpack_ops` names -> XLA's library fusion types ('dot': matmuls together with the
# elementwise ops XLA fuses around them; 3% faster on the CIFAR-10 train step than matmuls alone).
OPS = {
    "dot": "LIBRARY_FUSION_TYPE_DOT",
    "convolution": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "reduce": "LIBRARY_FUSION_TYPE_REDUCE",
}
JAX_DEFAULT = "jax"  # leave jax's own routing (all three in jax 0.10)
_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"


def ynnpack_ops(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The op kinds `xla.cpu_ynnpack_ops` hands to YNNPACK ('' = none), or None for jax's
    default ('jax', and configs saved before the key existed). Raises ConfigError."""
    value = (config.get("xla") or {}).get("cpu_ynnpack_ops", JAX_DEFAULT)
    if value == JAX_DEFAULT:
        return None
    names = [] if value == "" else str(value).split(",") if isinstance(value, str) else None
    if names is None or any(n not in OPS for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"xla.cpu_ynnpack_ops={value!r}; use a comma-separated subset of {sorted(OPS)}, "
            f"'' for none, or {JAX_DEFAULT!r} for jax's default"
        )
    return tuple(names)


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """`jax.jit(..., compiler_options=...)` for this config on the default backend: None
    (jax's defaults) off CPU or with `xla.cpu_ynnpack_ops='jax'`.

    With a routing, XLA's region analysis for copy insertion comes along: without it XLA:CPU
    copies the donated parameters and Adam moments every train step (1551 copies in the
    CIFAR-10 step, 567 with it), with bit-identical results and a 1-3% faster step."""
    ops = ynnpack_ops(config)
    if ops is None or jax.default_backend() != "cpu":
        return None
    return {_OPTION: ",".join(OPS[name] for name in ops), _REGION_ANALYSIS: True}
