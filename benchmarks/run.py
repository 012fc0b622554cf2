"""Benchmark suite: train step, denoising step and whole samplers for the digits and CIFAR-10
DDPM configs, with compile time, memory, XLA FLOPs and MFU.

Usage: python -m benchmarks.run [--quick | --smoke] [--out=benchmarks/results]
           [--only=train,denoise,sample]

Writes one JSON line per case to <out>/<date>.jsonl (<date>-quick.jsonl with --quick,
<date>-smoke.jsonl with --smoke) and the same as Markdown tables to <out>/<date>[-quick].md;
both are rewritten by each run. --quick runs a small subset (about 3 minutes on 2 idle CPU
cores; several times that under load, mostly the CIFAR train step's compile); --smoke only the
digits cases with one timed repeat (well under a minute), to check that every path still runs.

Cases (random data and random parameters: speed does not depend on the values):
  train    the real `train_state.make_train_step`, jitted by `runner.setup.jit_train_step` as
           the training loop runs it (replicated state, batch sharded over the 'data' mesh,
           state donated); images/s and compile time.
  denoise  one jitted U-Net forward in eval mode = one step of DDIM / DPM-Solver++ (heun: two).
  sample   `samplers.SamplerSpec.sample` (the whole lax.scan) in one jit, with the config's
           sampling options; wall time and denoising steps/s.
Every case reports median/min/max over repeats after warm-up, the compile time (lower +
compile), XLA's static buffer sizes, the peak memory while it ran (device peak on GPU, the
process RSS high-water above its level at the start of the case on CPU), XLA's FLOPs of the
model per image and MFU = achieved FLOP/s / the device's nominal peak for the compute dtype
(`benchmarks.peaks`; None on a device the table does not know; on CPU also vs a float32 2048^3
matmul measured at the start of the run). `model.dtype` is the compute dtype (parameters stay
float32). A lax.scan body is counted once by XLA's cost analysis, so sampler FLOPs are the
forward's times the number of model evaluations.
"""

from __future__ import annotations

import datetime
import os
import statistics
from typing import Any

import jax

from benchmarks import cases, common, peaks, timing
from diffusion_jax import samplers

# Tiers: --smoke runs the 'smoke' cases, --quick 'smoke' and 'quick', the full suite all.
TIERS = {"smoke": ("smoke",), "quick": ("smoke", "quick"), "full": ("smoke", "quick", "full")}
TRAIN_CASES = [  # (config, batch, dtype, tier)
    ("digits", 8, "float32", "full"),
    ("digits", 32, "float32", "smoke"),
    ("cifar10", 8, "float32", "quick"),
    ("cifar10", 32, "float32", "full"),
    ("cifar10", 8, "bfloat16", "full"),
]
DENOISE_CASES = [
    ("digits", 8, "float32", "full"),
    ("digits", 64, "float32", "smoke"),
    ("cifar10", 8, "float32", "quick"),
    ("cifar10", 8, "bfloat16", "quick"),
    ("cifar10", 64, "float32", "full"),
    ("cifar10", 64, "bfloat16", "full"),
]
SAMPLE_CASES = [  # (config, sampler, num_steps, batch, dtype, tier)
    ("digits", "ddim", 50, 8, "float32", "full"),
    ("digits", "dpm_solver++", 20, 8, "float32", "full"),
    ("digits", "ddim", 50, 64, "float32", "quick"),
    ("digits", "dpm_solver++", 20, 64, "float32", "smoke"),
    ("cifar10", "ddim", 50, 8, "float32", "full"),
    ("cifar10", "dpm_solver++", 20, 8, "float32", "full"),
    ("cifar10", "ddim", 50, 64, "float32", "full"),
    ("cifar10", "dpm_solver++", 20, 64, "float32", "full"),
]


def _finish(
    record: dict[str, Any],
    times: list[float],
    flops: float | None,
    items: int,
    matmul_gflops: float | None,
) -> dict[str, Any]:
    """Adds the timing summary, throughput, FLOPs and MFU to `record`."""
    record.update(timing.summarize(times))
    median = statistics.median(times)  # unrounded: GPU steps take microseconds
    record["images_per_s"] = round(items / median, 3)
    peak, peak_name = peaks.device_peak(record["dtype"])
    record["mfu_peak"] = peak_name
    record["mfu"] = None
    if flops is not None:
        achieved = flops / median / 1e9
        record["gflops_per_image"] = round(flops / items / 1e9, 4)
        record["achieved_gflops_per_s"] = round(achieved, 2)
        mfu = peaks.mfu(flops, median, peak)
        record["mfu"] = None if mfu is None else round(mfu, 4)
        if matmul_gflops:
            record["fraction_of_matmul"] = round(achieved / matmul_gflops, 4)
    return record


def _measure(
    compiled: Any, call: Any, *, warmup: int, repeats: int
) -> tuple[list[float], dict[str, float]]:
    """Times of `call` and the memory it used: XLA's static buffers and the measured peak."""
    with common.peak_memory() as mem:
        times = timing.timings(call, warmup=warmup, repeats=repeats)
    return times, {**common.compiled_memory_mb(compiled), **mem}


def bench_train(
    name: str, batch: int, dtype: str, *, warmup: int, repeats: int, matmul: float | None
) -> dict[str, Any]:
    case = cases.train_case(cases.load_config(name, dtype), batch)
    compile_s = case.compile()
    times, memory = _measure(case.compiled, case.run, warmup=warmup, repeats=repeats)
    record: dict[str, Any] = {
        "benchmark": "train_step",
        "config": name,
        "dtype": dtype,
        "batch_size": batch,
        "params": cases.num_params(case.state.params),
        "compile_s": round(compile_s, 2),
        **memory,
    }
    return _finish(record, times, common.compiled_flops(case.compiled), batch, matmul)


def bench_denoise(
    name: str, batch: int, dtype: str, *, warmup: int, repeats: int, matmul: float | None
) -> dict[str, Any]:
    config = cases.load_config(name, dtype)
    shape = cases.image_shape(config)
    model = cases.create_model(config)
    params = cases.random_params(model, shape)
    x, t = cases.random_inputs(batch, shape)
    compiled, compile_s = timing.compile_timed(
        cases.jit(config, cases.eval_forward(model)), params, x, t
    )
    times, memory = _measure(
        compiled, lambda: compiled(params, x, t), warmup=warmup, repeats=repeats
    )
    record: dict[str, Any] = {
        "benchmark": "denoise_step",
        "config": name,
        "dtype": dtype,
        "batch_size": batch,
        "params": cases.num_params(params),
        "compile_s": round(compile_s, 2),
        **memory,
    }
    record = _finish(record, times, common.compiled_flops(compiled), batch, matmul)
    record["steps_per_s"] = round(1.0 / record["median_s"], 3)
    return record


def forward_flops(model: Any, params: Any, shape: tuple[int, ...]) -> float | None:
    """XLA FLOPs of one eval-mode forward on a batch of `shape` (compiled, never run)."""
    x = jax.ShapeDtypeStruct(shape, jax.numpy.float32)
    t = jax.ShapeDtypeStruct((shape[0],), jax.numpy.int32)
    return common.compiled_flops(jax.jit(cases.eval_forward(model)).lower(params, x, t).compile())


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
    config = cases.load_config(name, dtype)
    shape = (batch, *cases.image_shape(config))
    model = cases.create_model(config)
    formulation = cases.get_formulation(config)
    params = cases.random_params(model, shape[1:])
    forward = cases.eval_forward(model)
    # The config's sampling options (clipping, spacing, ...), as the sample mode.
    spec = samplers.SamplerSpec.from_config(config).choose(sampler=sampler, num_steps=num_steps)

    def generate(params: Any, rng: jax.Array) -> jax.Array:
        return spec.sample(lambda x, t: forward(params, x, t), formulation, shape, rng)

    rng = jax.random.PRNGKey(0)
    compiled, compile_s = timing.compile_timed(cases.jit(config, generate), params, rng)
    times, memory = _measure(
        compiled, lambda: compiled(params, rng), warmup=warmup, repeats=repeats
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
        **memory,
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
    parser = common.argument_parser(__file__, __doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small subset, ~3 minutes idle")
    size.add_argument("--smoke", action="store_true", help="digits cases, 1 repeat: does it run")
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--only", default="train,denoise,sample", help="comma-separated kinds")
    parser.add_argument("--repeats", type=int, default=0, help="override timed repeats")
    args = parser.parse_args(argv)
    kinds = set(args.only.split(","))
    tier = "smoke" if args.smoke else "quick" if args.quick else "full"
    run_tiers = TIERS[tier]

    stem = common.output_stem(args.out, "" if tier == "full" else tier)
    jsonl = stem + ".jsonl"
    env = {**common.environment(), "date": datetime.date.today().isoformat()}
    env.update(quick=args.quick, tier=tier)
    matmul = None
    if env["backend"] == "cpu":
        matmul = round(common.measure_matmul_gflops(repeats=2 if args.smoke else 5), 1)
    env["matmul_gflops"] = matmul
    env["mfu_peak"] = peaks.device_peak("float32")[1]
    common.write_jsonl(jsonl, {"benchmark": "environment", **env})

    def reps(full: int, quick: int) -> int:
        return args.repeats or {"full": full, "quick": quick, "smoke": 1}[tier]

    warmup = 1 if args.smoke else 2
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        record["load_avg_1m"] = round(os.getloadavg()[0], 2)
        records.append(record)
        common.write_jsonl(jsonl, record)

    def selected(kind: str, table: list[tuple]) -> list[tuple]:
        """The cases of `table` (their tier dropped) this run asks for."""
        return [case[:-1] for case in table if kind in kinds and case[-1] in run_tiers]

    for name, batch, dtype in selected("train", TRAIN_CASES):
        emit(bench_train(name, batch, dtype, warmup=warmup, repeats=reps(5, 3), matmul=matmul))
    for name, batch, dtype in selected("denoise", DENOISE_CASES):
        emit(bench_denoise(name, batch, dtype, warmup=warmup, repeats=reps(7, 3), matmul=matmul))
    for name, sampler, steps, batch, dtype in selected("sample", SAMPLE_CASES):
        big = name == "cifar10" and batch >= 64  # minutes per run on CPU
        emit(
            bench_sample(
                *(name, sampler, steps, batch, dtype),
                warmup=0 if big else 1,
                repeats=reps(1 if big else 3, 2),
                matmul=matmul,
            )
        )
    env["load_avg_end"] = round(os.getloadavg()[0], 2)
    common.write_markdown(stem, [markdown(records, env)], echo=False)
    print(f"wrote {jsonl} and {stem}.md", flush=True)
    return records


if __name__ == "__main__":
    main()
