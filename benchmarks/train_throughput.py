"""Training throughput of the digits config's train step, data-parallel over 1 vs N devices.

Usage: python benchmarks/train_throughput.py [--devices 1,8] [--steps 20] [--repeats 1]
           [--batch-size 128] [--config configs/digits.py]

Each device count runs in its own subprocess (the CPU device count is fixed per process:
XLA_FLAGS=--xla_force_host_platform_device_count=N), alternating counts `--repeats` times. Prints
one JSON line per run (compile time, median step time, images/s) and a final summary line with
each count's median images/s relative to the first count. The step is the real jitted
`train_state.make_train_step` with replicated state and a batch sharded over a 'data' mesh, fed
random images (no data pipeline), as in `train_loop.train`.

On CPU the fake devices share the same cores, so this is a sanity figure for the sharded
program's overhead, not a scaling measurement. The machine's speed drifts under outside load:
compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runnable as `python benchmarks/train_throughput.py` from a checkout without installing.
sys.path.insert(0, REPO)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Time the train step on this process's devices; returns (and prints) one result."""
    import jax
    import numpy as np

    from diffusion_jax import parallel, schedules, train_state

    config = runpy.run_path(os.path.join(REPO, args.config))["get_config"]()
    batch_size = args.batch_size or config.training.batch_size
    image_shape = (config.data.image_size, config.data.image_size, 1)
    num_classes = 10
    mesh = parallel.create_mesh()
    parallel.check_divisible_batch(batch_size, mesh)
    model = train_state.create_model(config.model, num_classes)
    schedule = schedules.get_schedule(
        config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
    )
    optimizer = train_state.create_optimizer(config.training)
    replicated = parallel.replicated_sharding(mesh)
    init = jax.jit(
        lambda rng: train_state.init_train_state(model, optimizer, rng, image_shape),
        out_shardings=replicated,
    )
    state = init(jax.random.PRNGKey(0))
    step_fn = jax.jit(
        train_state.make_train_step(
            model, schedule, optimizer, config.diffusion, config.training.ema_decay
        ),
        in_shardings=(replicated, parallel.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    batch = parallel.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        },
        mesh,
    )

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    median_s = statistics.median(times)
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "config": args.config,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "num_cpu_threads": os.cpu_count(),
        "jax": jax.__version__,
        "batch_size": batch_size,
        "image_shape": list(image_shape),
        "params": sum(int(p.size) for p in jax.tree.leaves(state.params)),
        "compile_s": round(compile_s, 3),
        "steps": args.steps,
        "median_step_s": round(median_s, 5),
        "min_step_s": round(min(times), 5),
        "images_per_s": round(batch_size / median_s, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    per_count: dict[int, list[float]] = {c: [] for c in counts}
    child_args = [
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch-size={args.batch_size}",
        f"--config={args.config}",
    ]
    for _ in range(args.repeats):
        for count in counts:
            env = {**os.environ}
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", *child_args],
                env=env,
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            line = out.strip().splitlines()[-1]
            print(line, flush=True)
            per_count[count].append(json.loads(line)["images_per_s"])
    base = statistics.median(per_count[counts[0]])
    summary: dict[str, Any] = {
        "benchmark": "train_throughput_summary",
        "config": args.config,
        "median_images_per_s": {str(c): statistics.median(v) for c, v in per_count.items()},
        f"relative_to_{counts[0]}": {
            str(c): round(statistics.median(v) / base, 3) for c, v in per_count.items()
        },
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
