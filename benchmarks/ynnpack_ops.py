"""Which ops should XLA:CPU hand to YNNPACK? The train and denoising steps per routing, interleaved.

Usage: python -m benchmarks.ynnpack_ops [--config cifar10|digits] [--batch-size 8]
           [--routings jax,none,dot,reduce,dot+reduce,convolution] [--rounds 3] [--calls 3]
           [--out=benchmarks/results]

jax 0.10's XLA:CPU sends matmuls, convolutions and reductions to the YNNPACK library; the
rest, and whatever a routing leaves out, run on XLA's own kernels (Eigen convolutions and
matmuls, generated loops). A routing is a '+'-joined subset of `dot`, `convolution`, `reduce`
(`none`: nothing to YNNPACK; `jax`: jax's own default), the values `xla.cpu_ynnpack_ops` takes.
Every routing compiles the real train step (`runner.setup.jit_train_step`, as training runs it)
and the eval-mode U-Net forward in this one process; the cases then run round-robin
(`timing.interleaved`) so that outside load hits all alike. Reports per-step seconds, images/s
and the speedup over `jax` from the same rounds, and checks that every routing computes the
same function: the forward's largest difference from `jax`'s, relative to its largest value.
Writes <out>/<date>-ynnpack_ops_<config>_b<batch>.{jsonl,md}.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases, common, timing
from diffusion_jax.runner import xla_options

CASES = ("train_step", "denoise_step")


def build(config_name: str, batch: int, routing: str) -> dict[str, Any]:
    """Both cases of one routing, compiled; a `run` callable per case."""
    config = cases.load_config(
        config_name, ynnpack_ops="" if routing == "none" else routing.replace("+", ",")
    )
    train = cases.train_case(config, batch)
    train.compile()
    forward = cases.eval_forward(train.model)
    params = jax.tree.map(jnp.copy, train.state.ema_params)
    x = jnp.asarray(train.batch["image"])
    t = jnp.full((batch,), 500, jnp.int32)
    denoise = cases.jit(config, forward).lower(params, x, t).compile()
    return {
        "options": xla_options.compiler_options(config),
        "train_step": train.run,
        "denoise_step": lambda: denoise(params, x, t),
        "denoised": np.asarray(denoise(params, x, t)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--config", choices=sorted(cases.CONFIGS), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--routings", default="jax,none,dot,reduce,dot+reduce,convolution")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per case per round")
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    routings = args.routings.split(",")
    if "jax" not in routings:
        routings.insert(0, "jax")
    b = args.batch_size
    built = {r: build(args.config, b, r) for r in routings}
    reference = built["jax"]["denoised"]
    scale = float(np.max(np.abs(reference)))
    load: list[float] = []

    def measure(key: tuple[str, str]) -> float:
        routing, case = key
        times = timing.timings(built[routing][case], warmup=1, repeats=args.calls)
        load.append(os.getloadavg()[0])
        return statistics.median(times)

    keys = [(r, c) for c in CASES for r in routings]
    per_call = timing.interleaved(measure, keys, args.rounds)

    env = common.environment()
    stem = common.output_stem(args.out, f"ynnpack_ops_{args.config}_b{b}")
    common.write_jsonl(stem + ".jsonl", {"benchmark": "environment", **env})
    lines = [
        f"# XLA:CPU ops handed to YNNPACK, {args.config} U-Net, batch {b}, float32",
        "",
        f"jax {env['jax']}, {env['device_kind']} ({env['cpu_count']} CPUs); load average "
        f"{min(load):.1f}-{max(load):.1f} during the rounds. Seconds per call: median over "
        f"{args.rounds} round-robin rounds (each the median of {args.calls} calls after a "
        "warm-up); speedup = `jax`'s time / this routing's in the same round, median over "
        "rounds (min-max). Forward difference: largest |denoised - jax's| / largest |jax's|.",
        "",
        "| case | routing to YNNPACK | s/call | images/s | speedup vs jax | forward difference |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in CASES:
        for r in routings:
            times = per_call[(r, case)]
            med = statistics.median(times)
            speedup = timing.ratios(per_call[("jax", case)], times)
            diff = float(np.max(np.abs(built[r]["denoised"] - reference))) / scale
            common.write_jsonl(
                stem + ".jsonl",
                {
                    "benchmark": "ynnpack_ops",
                    "config": args.config,
                    "case": case,
                    "routing": r,
                    "compiler_options": built[r]["options"],
                    "batch_size": b,
                    "per_call_s": [round(t, 4) for t in times],
                    "median_s": round(med, 4),
                    "images_per_s": round(b / med, 2),
                    "speedup_vs_jax": speedup,
                    "forward_difference": diff,
                },
            )
            lines.append(
                f"| {case} | {r} | {med:.4f} | {b / med:.1f} | {speedup['median']:.2f}x "
                f"({speedup['min']:.2f}-{speedup['max']:.2f}) | {diff:.1e} |"
            )
    common.write_markdown(stem, lines)


if __name__ == "__main__":
    main()
