"""Benchmark one jitted forward pass of the CIFAR-10 DDPM U-Net (35.7M params).

Usage: python benchmarks/unet_forward.py [--batch-size 8] [--runs 10] [--dtype float32]

Prints one JSON line: compile time, median/min wall time of the forward after warm-up,
images/s, and the model FLOPs per image from XLA's cost analysis of the compiled program.
Runs on JAX's default backend (CPU here). The machine's speed drifts under outside load, so
compare numbers taken in one run (e.g. --dtype float32 vs bfloat16 back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Runnable as `python benchmarks/unet_forward.py` from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.models.unet import UNet

CIFAR10_MODEL: dict[str, Any] = dict(
    ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)


def _flops(compiled: Any) -> float | None:
    """Total FLOPs XLA reports for a compiled program (None if the backend reports none)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returned one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _random_params(model: UNet, x: jax.Array, t: jax.Array) -> Any:
    """Parameters with the model's shapes, filled from numpy: forward timing does not depend on
    the values, and this avoids compiling the (large) initialiser."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32)), shapes
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10, help="timed runs after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = UNet(**CIFAR10_MODEL, dtype=dtype)
    b, s = args.batch_size, args.image_size
    x = jax.random.normal(jax.random.key(1), (b, s, s, 3), jnp.float32)
    t = jax.random.randint(jax.random.key(2), (b,), 0, 1000, jnp.int32)
    params = _random_params(model, x, t)
    num_params = sum(int(p.size) for p in jax.tree.leaves(params))

    def forward(params: Any, x: jax.Array, t: jax.Array) -> Any:
        return model.apply({"params": params}, x, t, train=False)

    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(params, x, t).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, x, t))
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t))
        times.append(time.perf_counter() - t0)
    median_s = statistics.median(times)

    flops = _flops(compiled)
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "benchmark": "unet_forward",
        "model": "cifar10_ddpm",
        "params": num_params,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_cpu_threads": os.cpu_count(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "batch_size": b,
        "image_shape": [s, s, 3],
        "compile_s": round(compile_s, 3),
        "runs": args.runs,
        "median_s": round(median_s, 5),
        "min_s": round(min(times), 5),
        "max_s": round(max(times), 5),
        "images_per_s": round(b / median_s, 2),
        "flops_per_image": None if flops is None else flops / b,
        "gflops_per_image": None if flops is None else round(flops / b / 1e9, 3),
        "achieved_gflops_per_s": None if flops is None else round(flops / median_s / 1e9, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
