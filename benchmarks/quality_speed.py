"""Quality at speed on the trained digits model: digits FD and wall time per sampler.

Usage: python -m benchmarks.quality_speed [--workdir=workdirs/digits] [--num-samples 1000]
           [--rounds 2] [--torch-python=/tmp/bench_torch/bin/python] [--out=benchmarks/results]

The issue's goal: reach the sample quality of diffusers' DDIM-50 at least 2.5x faster in wall
time. DDIM-50 is the same algorithm in both frameworks, so on the same weights it gives the
same samples; its FD here (our DDIM-50 on the run's EMA parameters) is the quality bar. For each
sampler x steps this script draws `--num-samples` samples (seed 0, sample i from fold_in(key, i),
as the eval mode; the run's `sampler_spec()` with the sampler and steps replaced) in one jitted
call, computes the digits FD against the train split's reference
statistics, and times that call and `--rounds` more (compile excluded), the samplers round-robin so
drift under outside load hits all alike. With --torch-python it also times diffusers'
UNet2DModel in configs/digits.py's architecture (`benchmarks.torch_peer`; same parameter count,
random weights: speed does not depend on them) running DDIMScheduler-50 on the same number of
samples, between the JAX rounds. Writes <out>/<date>-quality_speed.{jsonl,md}.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
from typing import Any

import jax
import numpy as np

from benchmarks import cases, common, timing, workers
from diffusion_jax import images
from diffusion_jax.errors import UserError
from diffusion_jax.evaluation import digits_net, metrics, reference
from diffusion_jax.runner import loading

CANDIDATES = [  # (sampler, num_steps); the first is the quality bar
    ("ddim", 50),
    ("ddim", 20),
    ("dpm_solver++", 20),
    ("dpm_solver++", 15),
    ("dpm_solver++", 10),
    ("heun", 20),
    ("heun", 15),
    ("heun", 10),
    ("ddpm", 20),
    ("ddpm", 10),
]


def label(sampler: str, steps: int) -> str:
    return f"{sampler}-{steps}"


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--workdir", default=os.path.join(common.REPO, "workdirs", "digits"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1, help="extra timed runs per sampler")
    parser.add_argument(
        "--samplers",
        default="",
        help="subset, e.g. ddim-50,dpm_solver++-15,ddpm-10 (the first is the quality bar)",
    )
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--torch-python", default="", help="also time diffusers DDIM-50")
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.torch_python:
        workers.require_python(args.torch_python, "benchmarks.quality_speed --torch-python")

    candidates = CANDIDATES
    if args.samplers:
        candidates = [
            (name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1]))
            for name in args.samplers.split(",")
        ]
    network = digits_net.DigitsFeatures()
    # No checkpoint, data or reference statistics yet: the library's one-line fix, no traceback.
    try:
        loaded = loading.load_run(args.workdir)
        config = loaded.config
        ref = reference.load_reference_stats(
            reference.default_reference_path(config.data, config.eval.reference_split, "digits"),
            expected_network=network,
        )
    except UserError as error:
        sys.exit(f"benchmarks.quality_speed: {error}")
    n = args.num_samples
    shape = (n, *loaded.setup.image_shape)
    rng = jax.random.PRNGKey(0)

    def make(sampler: str, steps: int) -> Any:
        spec = loaded.sampler_spec().choose(sampler=sampler, num_steps=steps)

        def generate(params: Any, rng: jax.Array) -> jax.Array:
            return spec.sample(loaded.setup.model_fn(params), loaded.formulation, shape, rng)

        return cases.jit(loaded.setup.config, generate).lower(loaded.params, rng).compile()

    results: dict[str, dict[str, Any]] = {}
    compiled = {}
    for sampler, steps in candidates:
        name = label(sampler, steps)
        compiled[name], compile_s = timing.timed(functools.partial(make, sampler, steps))
        # Already compiled: the run that gives the FD counts as a timed run.
        x, first_s = timing.timed(functools.partial(compiled[name], loaded.params, rng))
        features, _ = network(images.to_uint8(np.asarray(x)))
        stats = metrics.FeatureStats.from_features(features)
        fd = metrics.frechet_distance(stats.mean, stats.cov, ref.stats.mean, ref.stats.cov)
        evals = 2 * steps - 1 if sampler == "heun" else steps
        results[name] = {
            "benchmark": "quality_speed",
            "framework": "jax",
            "sampler": sampler,
            "num_steps": steps,
            "model_evals": evals,
            "num_samples": n,
            "checkpoint_step": loaded.step,
            "fd": round(float(fd), 4),
            "compile_s": round(compile_s, 2),
            "times": [first_s],
        }
        print(name, "fd", round(float(fd), 4), flush=True)

    torch_worker = None
    torch_times: list[float] = []
    if args.torch_python:
        torch_worker = workers.torch_peer(args.torch_python, config="digits", batch_size=n)
    # Round-robin over the samplers (then torch), so drift under load hits all alike.
    for rnd in range(args.rounds):
        for name, fn in compiled.items():
            results[name]["times"].append(
                timing.timed(functools.partial(fn, loaded.params, rng))[1]
            )
        if torch_worker is not None:
            record = torch_worker.run("sampler", 1, 1 if rnd == 0 else 0)
            torch_times.append(record["median_s"])
    if torch_worker is not None:
        torch_worker.close()

    bar = results[label(*candidates[0])]
    bar_s = statistics.median(bar["times"])
    torch_s = statistics.median(torch_times) if torch_times else None
    stem = common.output_stem(args.out, f"quality_speed{args.tag}")
    env = common.environment()
    common.write_jsonl(stem + ".jsonl", {"benchmark": "environment", **env})
    lines = [
        f"# Quality at speed: digits ({args.workdir}, step {loaded.step}), {n} samples",
        "",
        f"jax {env['jax']} on {env['device_kind']} ({env['cpu_count']} CPUs); load average "
        f"{env['load_avg_1m']} at the end. FD: digits-classifier features vs the train split. "
        f"Wall time: one jitted call for all {n} samples, median of the FD run and "
        f"{args.rounds} round-robin runs, compile excluded. Speedup = DDIM-50's wall time / "
        "this sampler's.",
        "",
        "| sampler | steps | model evals | FD | FD <= DDIM-50's | wall s | speedup vs JAX "
        "DDIM-50 | speedup vs diffusers DDIM-50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.values():
        r["median_s"] = round(statistics.median(r["times"]), 3)
        r["times"] = [round(t, 3) for t in r["times"]]
        r["speedup_vs_jax_ddim50"] = round(bar_s / r["median_s"], 2)
        if torch_s:
            r["speedup_vs_torch_ddim50"] = round(torch_s / r["median_s"], 2)
        common.write_jsonl(stem + ".jsonl", r)
        lines.append(
            f"| {r['sampler']} | {r['num_steps']} | {r['model_evals']} | {r['fd']:.3f} | "
            f"{'yes' if r['fd'] <= bar['fd'] else 'no'} | {r['median_s']:.2f} | "
            f"{r['speedup_vs_jax_ddim50']:.2f}x | "
            f"{r.get('speedup_vs_torch_ddim50', '-')}{'x' if torch_s else ''} |"
        )
    if torch_s:
        common.write_jsonl(
            stem + ".jsonl",
            {
                "benchmark": "quality_speed",
                "framework": "torch",
                "sampler": "ddim",
                "num_steps": 50,
                "num_samples": n,
                "median_s": round(torch_s, 3),
                "times": [round(t, 3) for t in torch_times],
            },
        )
        lines += ["", f"diffusers DDIM-50 (digits architecture, {n} samples): {torch_s:.2f} s."]
    good = [r for r in results.values() if r["fd"] <= bar["fd"]]
    best = min(good, key=lambda r: r["median_s"])
    lines += [
        "",
        f"Fastest sampler at DDIM-50's FD ({bar['fd']:.3f}) or better: {best['sampler']}-"
        f"{best['num_steps']}, FD {best['fd']:.3f}, {best['speedup_vs_jax_ddim50']:.2f}x faster "
        "than JAX DDIM-50"
        + (f", {best['speedup_vs_torch_ddim50']:.2f}x than diffusers DDIM-50." if torch_s else "."),
    ]
    common.write_markdown(stem, lines)


if __name__ == "__main__":
    main()
