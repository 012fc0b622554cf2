"""Training throughput of the digits config's train step, data-parallel over 1 vs N devices.

Usage: python -m benchmarks.train_throughput [--devices 1,8] [--steps 20] [--repeats 1]
           [--batch-size 128] [--config configs/digits.py]

Each device count runs in its own subprocess (the CPU device count is fixed per process:
XLA_FLAGS=--xla_force_host_platform_device_count=N), alternating counts `--repeats` times. Prints
one JSON line per run (compile time, median step time, images/s) and a final summary line with
each count's images/s relative to the first count's in the same round (median over rounds).
The step is the real `train_state.make_train_step` jitted by `runner.setup.jit_train_step`
(replicated state, batch sharded over a 'data' mesh, state donated), as the training loop runs
it, fed random images (no data pipeline).

On CPU the fake devices share the same cores, so this is a sanity figure for the sharded
program's overhead, not a scaling measurement. The machine's speed drifts under outside load:
compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

from benchmarks import common, timing, workers


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Time the train step on this process's devices; returns (and prints) one result."""
    import jax

    from benchmarks import cases

    config = cases.load_config(args.config)
    case = cases.train_case(config, args.batch_size or config.training.batch_size)
    compile_s = case.compile()
    times = timing.timings(case.run, warmup=args.warmup, repeats=args.steps)
    median_s = statistics.median(times)
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "config": args.config,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "num_cpu_threads": os.cpu_count(),
        "jax": jax.__version__,
        "batch_size": case.batch["image"].shape[0],
        "image_shape": list(cases.image_shape(config)),
        "params": cases.num_params(case.state.params),
        "compile_s": round(compile_s, 3),
        "steps": args.steps,
        "median_step_s": round(median_s, 5),
        "min_step_s": round(min(times), 5),
        "images_per_s": round(case.batch["image"].shape[0] / median_s, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per count")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's")
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    counts = [int(c) for c in args.devices.split(",")]
    child_args = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--config={args.config}",
    ]

    def measure(count: int) -> float:
        # The fake CPU device count is fixed per process: one process per count.
        flags = f"--xla_force_host_platform_device_count={count}"
        record = workers.run_module("train_throughput", ["--child", *child_args], flags)
        print(json.dumps(record), flush=True)
        return float(record["images_per_s"])

    per_count = timing.interleaved(measure, counts, args.repeats)
    summary: dict[str, Any] = {
        "benchmark": "train_throughput_summary",
        "config": args.config,
        "median_images_per_s": {str(c): statistics.median(v) for c, v in per_count.items()},
        f"relative_to_{counts[0]}": {
            str(c): round(timing.ratios(v, per_count[counts[0]])["median"], 3)
            for c, v in per_count.items()
        },
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
