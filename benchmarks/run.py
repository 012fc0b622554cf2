"""Benchmark suite: train step, denoising step and whole samplers for the digits and CIFAR-10
DDPM configs, with compile time, memory, XLA FLOPs and MFU.

Usage: python benchmarks/run.py [--quick] [--out=benchmarks/results] [--only=train,denoise,sample]

Writes one JSON line per case to <out>/<date>.jsonl (<date>-quick.jsonl with --quick) and the
same as Markdown tables to <out>/<date>[-quick].md; both are rewritten by each run. --quick runs
a small subset (about 3 minutes on 2 idle CPU cores; several times that under load, mostly
the CIFAR train step's compile).

Cases (random data and random parameters: speed does not depend on the values):
  train    the real `train_state.make_train_step`, jitted as `train_loop` does (replicated state,
           batch sharded over the 'data' mesh, state donated); images/s and compile time.
  denoise  one jitted U-Net forward in eval mode = one step of DDIM / DPM-Solver++ (heun: two).
  sample   `samplers.sample` (the whole lax.scan) in one jit; wall time and denoising steps/s.
Every case reports median/min/max over repeats after warm-up, the compile time (lower +
compile), XLA's static buffer sizes, the peak memory while it ran (device peak on GPU, the
process RSS high-water above its level at the start of the case on CPU), XLA's FLOPs of the
model per image and MFU = achieved FLOP/s / nominal peak (see `common.peak_gflops`; on CPU also
vs a float32 2048^3 matmul measured at the start of the run). `model.dtype` is the compute dtype
(parameters stay float32). A lax.scan body is counted once by XLA's cost analysis, so sampler
FLOPs are the forward's times the number of model evaluations.
"""

from __future__ import annotations

import argparse
import datetime
import os
import runpy
import time
from collections.abc import Callable
from typing import Any

import common  # first: puts the repository on sys.path
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import parallel, samplers, schedules, train_state

CONFIGS = {"digits": "configs/digits.py", "cifar10": "configs/cifar10_ddpm.py"}
# Full suite; --quick takes the cases marked True.
TRAIN_CASES = [  # (config, batch, dtype, quick)
    ("digits", 8, "float32", False),
    ("digits", 32, "float32", True),
    ("cifar10", 8, "float32", True),
    ("cifar10", 32, "float32", False),
    ("cifar10", 8, "bfloat16", False),
]
DENOISE_CASES = [
    ("digits", 8, "float32", False),
    ("digits", 64, "float32", True),
    ("cifar10", 8, "float32", True),
    ("cifar10", 8, "bfloat16", True),
    ("cifar10", 64, "float32", False),
    ("cifar10", 64, "bfloat16", False),
]
SAMPLE_CASES = [  # (config, sampler, num_steps, batch, dtype, quick)
    ("digits", "ddim", 50, 8, "float32", False),
    ("digits", "dpm_solver++", 20, 8, "float32", False),
    ("digits", "ddim", 50, 64, "float32", True),
    ("digits", "dpm_solver++", 20, 64, "float32", True),
    ("cifar10", "ddim", 50, 8, "float32", False),
    ("cifar10", "dpm_solver++", 20, 8, "float32", False),
    ("cifar10", "ddim", 50, 64, "float32", False),
    ("cifar10", "dpm_solver++", 20, 64, "float32", False),
]


def load_config(name: str, dtype: str) -> ml_collections.ConfigDict:
    config = runpy.run_path(os.path.join(common.REPO, CONFIGS[name]))["get_config"]()
    config.model.dtype = dtype
    return config


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    channels = 1 if config.data.name == "digits" else 3
    return (config.data.image_size, config.data.image_size, channels)


def random_params(model: Any, shape: tuple[int, int, int]) -> Any:
    """Parameters with the model's shapes from numpy (skips compiling the initialiser)."""
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, train=False), x, t)
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, dtype=np.float32)),
        shapes["params"],
    )


def _compile(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _finish(
    record: dict[str, Any],
    times: list[float],
    flops: float | None,
    items: int,
    matmul_gflops: float | None,
) -> dict[str, Any]:
    """Adds the timing summary, throughput, FLOPs and MFU to `record`."""
    median = float(np.median(times))
    record.update(common.summarize(times))
    record["images_per_s"] = round(items / median, 3)
    peak, peak_name = common.peak_gflops(record["dtype"])
    if flops is not None:
        achieved = flops / median / 1e9
        record["gflops_per_image"] = round(flops / items / 1e9, 4)
        record["achieved_gflops_per_s"] = round(achieved, 2)
        record["mfu"] = round(achieved / peak, 4)
        record["mfu_peak"] = peak_name
        if matmul_gflops:
            record["fraction_of_matmul"] = round(achieved / matmul_gflops, 4)
    return record


def bench_train(
    name: str, batch: int, dtype: str, *, warmup: int, repeats: int, matmul: float | None
) -> dict[str, Any]:
    config = load_config(name, dtype)
    shape = image_shape(config)
    model = train_state.create_model(config.model, None)
    schedule = schedules.get_schedule(
        config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
    )
    optimizer = train_state.create_optimizer(config.training)
    mesh = parallel.create_mesh()
    replicated = parallel.replicated_sharding(mesh)
    init = jax.jit(
        lambda rng: train_state.init_train_state(model, optimizer, rng, shape),
        out_shardings=replicated,
    )
    holder = [init(jax.random.PRNGKey(0))]
    # As train_loop jits it: replicated state, sharded batch, the state donated.
    step_fn = jax.jit(
        train_state.make_train_step(
            model, schedule, optimizer, config.diffusion, config.training.ema_decay
        ),
        in_shardings=(replicated, parallel.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    data = parallel.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch, *shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
        },
        mesh,
    )
    compiled, compile_s = _compile(step_fn, holder[0], data)

    def run() -> None:
        holder[0], metrics = compiled(holder[0], data)
        jax.block_until_ready((holder[0], metrics))

    with common.peak_memory() as mem:
        times = common.timings(run, warmup=warmup, repeats=repeats)
    record: dict[str, Any] = {
        "benchmark": "train_step",
        "config": name,
        "dtype": dtype,
        "batch_size": batch,
        "params": sum(int(p.size) for p in jax.tree.leaves(holder[0].params)),
        "compile_s": round(compile_s, 2),
        **common.compiled_memory_mb(compiled),
        **mem,
    }
    return _finish(record, times, common.compiled_flops(compiled), batch, matmul)


def _model_fn_factory(model: Any) -> Callable[[Any], Callable[..., jax.Array]]:
    def make(params: Any) -> Callable[..., jax.Array]:
        return lambda x, t: model.apply({"params": params}, x, t, train=False)

    return make


def bench_denoise(
    name: str, batch: int, dtype: str, *, warmup: int, repeats: int, matmul: float | None
) -> dict[str, Any]:
    config = load_config(name, dtype)
    shape = image_shape(config)
    model = train_state.create_model(config.model, None)
    params = random_params(model, shape)
    x = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
    t = jax.random.randint(jax.random.key(2), (batch,), 0, 1000, jnp.int32)
    make = _model_fn_factory(model)
    compiled, compile_s = _compile(jax.jit(lambda p, x, t: make(p)(x, t)), params, x, t)
    with common.peak_memory() as mem:
        times = common.timings(
            lambda: compiled(params, x, t).block_until_ready(), warmup=warmup, repeats=repeats
        )
    record: dict[str, Any] = {
        "benchmark": "denoise_step",
        "config": name,
        "dtype": dtype,
        "batch_size": batch,
        "params": sum(int(p.size) for p in jax.tree.leaves(params)),
        "compile_s": round(compile_s, 2),
        **common.compiled_memory_mb(compiled),
        **mem,
    }
    record = _finish(record, times, common.compiled_flops(compiled), batch, matmul)
    record["steps_per_s"] = round(1.0 / record["median_s"], 3)
    return record


def forward_flops(model: Any, params: Any, shape: tuple[int, ...]) -> float | None:
    """XLA FLOPs of one eval-mode forward on a batch of `shape` (compiled, never run)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((shape[0],), jnp.int32)
    make = _model_fn_factory(model)
    return common.compiled_flops(
        jax.jit(lambda p, x, t: make(p)(x, t)).lower(params, x, t).compile()
    )


def bench_sample(
    name: str,
    sampler: str,
    num_steps: int,
    batch: int,
    dtype: str,
    *,
    warmup: int,
    repeats: int,
    matmul: float | None,
) -> dict[str, Any]:
    config = load_config(name, dtype)
    shape = (batch, *image_shape(config))
    model = train_state.create_model(config.model, None)
    schedule = schedules.get_schedule(
        config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
    )
    params = random_params(model, shape[1:])
    make = _model_fn_factory(model)

    def generate(params: Any, rng: jax.Array) -> jax.Array:
        return samplers.sample(
            make(params), schedule, shape, rng, sampler=sampler, num_steps=num_steps
        )

    rng = jax.random.PRNGKey(0)
    compiled, compile_s = _compile(jax.jit(generate), params, rng)
    with common.peak_memory() as mem:
        times = common.timings(
            lambda: compiled(params, rng).block_until_ready(), warmup=warmup, repeats=repeats
        )
    evals = 2 * num_steps - 1 if sampler == "heun" else num_steps
    fwd = forward_flops(model, params, shape)
    record: dict[str, Any] = {
        "benchmark": "sampler",
        "config": name,
        "dtype": dtype,
        "sampler": sampler,
        "num_steps": num_steps,
        "model_evals": evals,
        "batch_size": batch,
        "compile_s": round(compile_s, 2),
        **common.compiled_memory_mb(compiled),
        **mem,
    }
    record = _finish(record, times, None if fwd is None else fwd * evals, batch, matmul)
    record["denoise_steps_per_s"] = round(evals / record["median_s"], 3)
    return record


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(records: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """Markdown tables of a run's records, one per benchmark kind."""
    lines = [
        f"# Benchmarks {env['date']}",
        "",
        f"device: {env['device_kind']} ({env['backend']}, {env['cpu_count']} CPUs), "
        f"jax {env['jax']}, python {env['python']}; load average at start "
        f"{env['load_avg_1m']}, at end {env.get('load_avg_end')}; float32 matmul "
        f"{env.get('matmul_gflops')} GFLOP/s measured; MFU vs {env['mfu_peak']}.",
        "",
        "Times: median (min-max) over repeats after warm-up. Memory: XLA temp buffers and the "
        "process RSS rise during the case (device peak on GPU).",
        "",
    ]
    columns = {
        "train_step": ["config", "dtype", "batch_size"],
        "denoise_step": ["config", "dtype", "batch_size"],
        "sampler": ["config", "sampler", "num_steps", "batch_size", "dtype"],
    }
    for kind, keys in columns.items():
        rows = [r for r in records if r["benchmark"] == kind]
        if not rows:
            continue
        rate = {"sampler": "denoise steps/s"}.get(kind, "images/s")
        head = [*keys, "median s", "min-max s", rate, "compile s", "GFLOP/img", "GFLOP/s"]
        head += ["MFU", "XLA temp MB", "RSS rise MB"]
        lines += [f"## {kind}", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + " --- |" * len(head))
        for r in rows:
            speed = r["denoise_steps_per_s"] if kind == "sampler" else r["images_per_s"]
            mem = r.get("peak_rss_delta_mb", r.get("device_peak_mb"))
            cells = [_fmt(r.get(k)) for k in keys] + [
                _fmt(r["median_s"]),
                f"{_fmt(r['min_s'])}-{_fmt(r['max_s'])}",
                _fmt(speed),
                _fmt(r["compile_s"]),
                _fmt(r.get("gflops_per_image")),
                _fmt(r.get("achieved_gflops_per_s")),
                f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                _fmt(r.get("xla_temp_mb")),
                _fmt(mem),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset, ~2-3 minutes")
    parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"))
    parser.add_argument("--only", default="train,denoise,sample", help="comma-separated kinds")
    parser.add_argument("--repeats", type=int, default=0, help="override timed repeats")
    args = parser.parse_args(argv)
    kinds = set(args.only.split(","))

    os.makedirs(args.out, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = os.path.join(args.out, f"{date}{'-quick' if args.quick else ''}")
    jsonl = stem + ".jsonl"
    if os.path.exists(jsonl):
        os.remove(jsonl)
    env = {**common.environment(), "date": date, "quick": args.quick}
    matmul = None
    if env["backend"] == "cpu":
        matmul = round(common.measure_matmul_gflops(), 1)
    env["matmul_gflops"] = matmul
    env["mfu_peak"] = common.peak_gflops("float32")[1]
    common.write_jsonl(jsonl, {"benchmark": "environment", **env})

    def reps(full: int, quick: int) -> int:
        return args.repeats or (quick if args.quick else full)

    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        record["load_avg_1m"] = round(os.getloadavg()[0], 2)
        records.append(record)
        common.write_jsonl(jsonl, record)

    if "train" in kinds:
        for name, batch, dtype, quick in TRAIN_CASES:
            if quick or not args.quick:
                emit(bench_train(name, batch, dtype, warmup=2, repeats=reps(5, 3), matmul=matmul))
    if "denoise" in kinds:
        for name, batch, dtype, quick in DENOISE_CASES:
            if quick or not args.quick:
                emit(bench_denoise(name, batch, dtype, warmup=2, repeats=reps(7, 3), matmul=matmul))
    if "sample" in kinds:
        for name, sampler, steps, batch, dtype, quick in SAMPLE_CASES:
            if quick or not args.quick:
                big = name == "cifar10" and batch >= 64  # minutes per run on CPU
                emit(
                    bench_sample(
                        name,
                        sampler,
                        steps,
                        batch,
                        dtype,
                        warmup=0 if big else 1,
                        repeats=reps(1 if big else 3, 2),
                        matmul=matmul,
                    )
                )
    env["load_avg_end"] = round(os.getloadavg()[0], 2)
    with open(stem + ".md", "w") as f:
        f.write(markdown(records, env) + "\n")
    print(f"wrote {jsonl} and {stem}.md", flush=True)
    return records


if __name__ == "__main__":
    main()
