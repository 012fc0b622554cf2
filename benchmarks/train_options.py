"""Cheap options for the train step, measured interleaved: donation, k steps per call, bf16, remat.

Usage: python benchmarks/train_options.py [--config cifar10|digits] [--batch-size 8]
           [--variants base,no_donate,scan4,bf16,remat] [--rounds 3] [--out=benchmarks/results]

Variants of the real `train_state.make_train_step`, each compiled once, then timed round-robin
(`--rounds` rounds of 2 calls after one warm-up) so outside load hits all alike:
  base       as train_loop: jit with the state donated (donate_argnums=0)
  no_donate  the same without donation (XLA must keep the old state alive and copy)
  scan4      4 train steps per call: lax.scan over a (4, B, ...) stack of batches (one
             dispatch and one host sync per 4 steps); time reported per step
  bf16       model.dtype = bfloat16 (parameters and optimizer stay float32)
  remat      jax.checkpoint (flax nn.remat) around every ResnetBlock, by swapping the class in
             diffusion_jax.models.unet for the duration of tracing (no change to the library)
Reports per-step median seconds, images/s, the ratio to `base` from the same rounds, compile
seconds and XLA's temporary buffer size. Writes <out>/<date>-train_options_<config>.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import common  # first: puts the repository on sys.path
import flax.linen as nn
import jax
import numpy as np
import run as suite

from diffusion_jax import parallel, schedules, train_state
from diffusion_jax.models import unet

SCAN_K = 4


@contextmanager
def remat_resnet_blocks() -> Iterator[None]:
    """Every ResnetBlock the U-Net builds inside the block is wrapped in nn.remat."""
    original = unet.ResnetBlock

    class Positional(original):  # type: ignore[misc, valid-type]
        # nn.remat makes positional arguments static by index; `train` is keyword-only upstream.
        def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
            return original.__call__(self, x, temb, train=train)

    remat_cls = nn.remat(Positional, static_argnums=(3,))

    def factory(*args: Any, **kwargs: Any) -> Callable[..., jax.Array]:
        module = remat_cls(*args, **kwargs)
        return lambda h, temb, *, train: module(h, temb, train)

    unet.ResnetBlock = factory  # type: ignore[assignment, misc]
    try:
        yield
    finally:
        unet.ResnetBlock = original  # type: ignore[misc]


def build(variant: str, name: str, batch: int) -> dict[str, Any]:
    """Compiled step, its inputs and how many train steps one call makes."""
    config = suite.load_config(name, "bfloat16" if variant == "bf16" else "float32")
    shape = suite.image_shape(config)
    model = train_state.create_model(config.model, None)
    schedule = schedules.get_schedule(
        config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
    )
    optimizer = train_state.create_optimizer(config.training)
    step = train_state.make_train_step(
        model, schedule, optimizer, config.diffusion, config.training.ema_decay
    )
    mesh = parallel.create_mesh()
    replicated = parallel.replicated_sharding(mesh)
    state = jax.jit(
        lambda rng: train_state.init_train_state(model, optimizer, rng, shape),
        out_shardings=replicated,
    )(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    k = SCAN_K if variant == "scan4" else 1
    lead = (k,) if k > 1 else ()
    data = {
        "image": rng.uniform(-1, 1, (*lead, batch, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, (*lead, batch)).astype(np.int32),
    }
    data = jax.device_put(data, replicated)
    if k > 1:

        def multi(state: Any, batches: Any) -> Any:
            state, metrics = jax.lax.scan(step, state, batches)
            return state, jax.tree.map(lambda m: m[-1], metrics)

        fn = jax.jit(multi, donate_argnums=0)
    else:
        fn = jax.jit(step, donate_argnums=() if variant == "no_donate" else 0)
    t0 = time.perf_counter()
    if variant == "remat":
        with remat_resnet_blocks():
            compiled = fn.lower(state, data).compile()
    else:
        compiled = fn.lower(state, data).compile()
    return {
        "compiled": compiled,
        "state": state,
        "data": data,
        "steps_per_call": k,
        "compile_s": time.perf_counter() - t0,
        "memory": common.compiled_memory_mb(compiled),
        "flops": common.compiled_flops(compiled),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(suite.CONFIGS), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="base,no_donate,scan4,bf16,remat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per variant per round")
    parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    b = args.batch_size
    built = {}
    for v in variants:
        built[v] = build(v, args.config, b)
        print(f"{v}: compiled in {built[v]['compile_s']:.1f} s", flush=True)

    per_step: dict[str, list[float]] = {v: [] for v in variants}
    load = []
    for _ in range(args.rounds):
        for v in variants:
            entry = built[v]

            def call(entry: dict[str, Any] = entry) -> None:
                entry["state"], metrics = entry["compiled"](entry["state"], entry["data"])
                jax.block_until_ready((entry["state"], metrics))

            times = common.timings(call, warmup=1, repeats=args.calls)
            per_step[v].append(statistics.median(times) / entry["steps_per_call"])
            load.append(os.getloadavg()[0])

    env = common.environment()
    stem = os.path.join(
        args.out, f"{datetime.date.today().isoformat()}-train_options_{args.config}_b{b}"
    )
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(stem + ".jsonl"):
        os.remove(stem + ".jsonl")
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
        speedup = (
            statistics.median(bt / t for bt, t in zip(base, times, strict=True)) if base else None
        )
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
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
