"""Cheap options for the train step, measured interleaved: donation, k steps per call, bf16, remat.

Usage: python -m benchmarks.train_options [--config cifar10|digits] [--batch-size 8]
           [--variants base,no_donate,scan4,bf16,remat] [--rounds 3] [--out=benchmarks/results]

Variants of the real `train_state.make_train_step`, each compiled once, then timed round-robin
(`--rounds` rounds of `--calls` calls after one warm-up, `timing.interleaved`) so outside
load hits all alike:
  base       as the training loop: `runner.setup.jit_train_step` (replicated state, sharded
             batch, state donated)
  no_donate  the same without donation (XLA must keep the old state alive and copy)
  scan4      4 train steps per call: lax.scan over a (4, B, ...) stack of batches (one
             dispatch and one host sync per 4 steps); time reported per step
  bf16       model.dtype = bfloat16 (parameters and optimizer stay float32)
  remat      model.remat = True: nn.remat around every ResnetBlock (the library's option)
Reports per-step median seconds, images/s, the ratio to `base` from the same rounds, compile
seconds and XLA's temporary buffer size. Writes <out>/<date>-train_options_<config>.{jsonl,md}.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import jax

from benchmarks import cases, common, timing
from diffusion_jax import parallel

SCAN_K = 4


def build(variant: str, name: str, batch: int) -> dict[str, Any]:
    """The variant's train case, compiled, and how many train steps one call makes."""
    config = cases.load_config(name, "bfloat16" if variant == "bf16" else "float32")
    config.model.remat = variant == "remat"
    case = cases.train_case(config, batch)  # base, bf16, remat: jit_train_step as training
    steps_per_call = 1
    replicated = parallel.replicated_sharding(case.mesh)
    if variant == "no_donate":
        # Deliberately not jit_train_step: its wiring with the donation left out.
        case.jitted = jax.jit(
            case.step,
            in_shardings=(replicated, parallel.batch_sharding(case.mesh)),
            out_shardings=(replicated, replicated),
        )
    elif variant == "scan4":
        # Deliberately its own jit: k steps per call over a (k, B, ...) stack, which the batch
        # sharding of jit_train_step does not describe; the stack is replicated instead.
        steps_per_call = SCAN_K
        step = case.step

        def multi(state: Any, batches: Any) -> Any:
            state, metrics = jax.lax.scan(step, state, batches)
            return state, jax.tree.map(lambda m: m[-1], metrics)

        host = cases.random_batch(batch, cases.image_shape(config), lead=(SCAN_K,))
        case.batch = jax.device_put(host, replicated)
        case.jitted = jax.jit(multi, donate_argnums=0)
    compile_s = case.compile()
    return {
        "case": case,
        "steps_per_call": steps_per_call,
        "compile_s": compile_s,
        "memory": common.compiled_memory_mb(case.compiled),
        "flops": common.compiled_flops(case.compiled),
    }


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--config", choices=sorted(cases.CONFIGS), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="base,no_donate,scan4,bf16,remat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per variant per round")
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    b = args.batch_size
    built = {}
    for v in variants:
        built[v] = build(v, args.config, b)
        print(f"{v}: compiled in {built[v]['compile_s']:.1f} s", flush=True)

    load: list[float] = []

    def measure(v: str) -> float:
        times = timing.timings(built[v]["case"].run, warmup=1, repeats=args.calls)
        load.append(os.getloadavg()[0])
        return statistics.median(times) / built[v]["steps_per_call"]

    per_step = timing.interleaved(measure, variants, args.rounds)

    env = common.environment()
    stem = common.output_stem(args.out, f"train_options_{args.config}_b{b}")
    common.write_jsonl(stem + ".jsonl", {"benchmark": "environment", **env})
    base = per_step.get("base")
    lines = [
        f"# Train-step options, {args.config}, batch {b}",
        "",
        f"jax {env['jax']}, {env['device_kind']} ({env['cpu_count']} CPUs); load average "
        f"{min(load):.1f}-{max(load):.1f} during the rounds. Per-step seconds: median over "
        f"{args.rounds} round-robin rounds (each the median of {args.calls} calls after a "
        "warm-up); speedup = base's time / this variant's in the same round, median over rounds.",
        "",
        "| variant | s/step | min-max | images/s | speedup vs base | compile s | XLA temp MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        times = per_step[v]
        med = statistics.median(times)
        speedup = timing.ratios(base, times)["median"] if base else None
        record = {
            "benchmark": "train_option",
            "config": args.config,
            "variant": v,
            "batch_size": b,
            "per_step_s": [round(t, 4) for t in times],
            "median_s": round(med, 4),
            "images_per_s": round(b / med, 2),
            "speedup_vs_base": None if speedup is None else round(speedup, 3),
            "compile_s": round(built[v]["compile_s"], 1),
            **built[v]["memory"],
        }
        common.write_jsonl(stem + ".jsonl", record)
        lines.append(
            f"| {v} | {med:.3f} | {min(times):.3f}-{max(times):.3f} | {b / med:.2f} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | {record['compile_s']} | "
            f"{record.get('xla_temp_mb', '-')} |"
        )
    common.write_markdown(stem, lines)


if __name__ == "__main__":
    main()
