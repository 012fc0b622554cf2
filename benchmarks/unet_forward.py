"""Benchmark one jitted forward pass of the CIFAR-10 DDPM U-Net (35.7M params).

Usage: python -m benchmarks.unet_forward [--batch-size 8] [--runs 10] [--dtype float32]

Prints one JSON line: compile time, median/min wall time of the forward after warm-up,
images/s, and the model FLOPs per image from XLA's cost analysis of the compiled program.
The model is configs/cifar10_ddpm.py's. Runs on JAX's default backend (CPU here). The machine's
speed drifts under outside load, so compare numbers taken in one run (e.g. --dtype float32 vs
bfloat16 back to back); benchmarks.xla_flags runs this module once per XLA flag set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from benchmarks import cases, common, peaks, timing


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10, help="timed runs after warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    config = cases.load_config("cifar10", args.dtype)
    config.data.image_size = args.image_size
    model = cases.create_model(config)
    shape = cases.image_shape(config)
    b = args.batch_size
    x, t = cases.random_inputs(b, shape)
    params = cases.random_params(model, shape)
    compiled, compile_s = timing.compile_timed(
        cases.jit(config, cases.eval_forward(model)), params, x, t
    )
    times = timing.timings(lambda: compiled(params, x, t), warmup=args.warmup, repeats=args.runs)
    summary = timing.summarize(times)
    median_s = summary["median_s"]

    flops = common.compiled_flops(compiled)
    device = jax.devices()[0]
    peak, peak_name = peaks.device_peak(args.dtype)
    mfu = None if flops is None else peaks.mfu(flops, median_s, peak)
    result: dict[str, Any] = {
        "benchmark": "unet_forward",
        "model": "cifar10_ddpm",
        "params": cases.num_params(params),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_cpu_threads": os.cpu_count(),
        "jax": jax.__version__,
        "dtype": args.dtype,
        "batch_size": b,
        "image_shape": list(shape),
        "compile_s": round(compile_s, 3),
        "runs": args.runs,
        **summary,
        "images_per_s": round(b / median_s, 2),
        "flops_per_image": None if flops is None else flops / b,
        "gflops_per_image": None if flops is None else round(flops / b / 1e9, 3),
        "achieved_gflops_per_s": None if flops is None else round(flops / median_s / 1e9, 2),
        "mfu": None if mfu is None else round(mfu, 4),
        "mfu_peak": peak_name,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
