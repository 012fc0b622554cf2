"""Discretisation error of the deterministic samplers on Gaussian data, vs the number of steps.

For data x0 ~ N(mu, s^2) per pixel the optimal eps model is closed form and the probability-flow
ODE from x_T at t = T-1 to t = 0 is affine, so the error of `samplers.sample` against the exact
solution (followed by the optimal denoiser, as the samplers end) is pure discretisation error.
Prints one row per (sampler, num_steps) and the fitted log-log slope (the observed order).

    python benchmarks/sampler_gaussian_error.py [--schedule=linear] [--num_timesteps=1000]
        [--steps=6,11,21,41,81,161,321] [--format=markdown|jsonl] [--x64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax import diffusion, samplers, schedules

MU, S = 0.3, 0.5
ODE_SAMPLERS = ("ddim", "dpm_solver++", "heun")


def gaussian_eps_model(sch: schedules.Schedule, mu: float, s: float):
    """Optimal eps(x_t, t) = sigma (x_t - a mu) / (a^2 s^2 + sigma^2) for data N(mu, s^2)."""

    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        ab = diffusion.extract(sch.alphas_cumprod, t, x_t.ndim)
        a, sigma = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        return sigma * (x_t - a * mu) / (a * a * s * s + sigma * sigma)

    return model_fn


def exact_sample(sch: schedules.Schedule, x_start: np.ndarray, mu: float, s: float) -> np.ndarray:
    """float64 PF-ODE solution from x_start at t = T-1 to t = 0, then the optimal x0(x, 0)."""
    ab = sch.alphas_cumprod
    a_t, sig_t = math.sqrt(ab[-1]), math.sqrt(1 - ab[-1])
    a_0, sig_0 = math.sqrt(ab[0]), math.sqrt(1 - ab[0])
    var_t, var_0 = a_t**2 * s**2 + sig_t**2, a_0**2 * s**2 + sig_0**2
    x_0 = a_0 * mu + math.sqrt(var_0 / var_t) * (x_start - a_t * mu)
    return mu + a_0 * s**2 * (x_0 - a_0 * mu) / var_0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--num_timesteps", type=int, default=1000)
    parser.add_argument("--steps", default="6,11,21,41,81,161,321")
    parser.add_argument("--format", choices=("markdown", "jsonl"), default="markdown")
    parser.add_argument("--x64", action="store_true", help="run in float64")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)

    sch = schedules.get_schedule(args.schedule, args.num_timesteps)
    steps = [int(n) for n in args.steps.split(",")]
    x_start = np.linspace(-3.0, 3.0, 256).reshape(4, 64)  # +-3 std of N(0, I)
    reference = exact_sample(sch, x_start, MU, S)
    model = gaussian_eps_model(sch, MU, S)

    rows: list[dict[str, Any]] = []
    for sampler in ODE_SAMPLERS:
        for num_steps in steps:
            start = time.perf_counter()
            out = samplers.sample(
                model,
                sch,
                x_start.shape,
                jax.random.key(0),
                sampler=sampler,
                num_steps=num_steps,
                clip_x0=False,
                x_init=jnp.asarray(x_start),
            )
            out = np.asarray(out, np.float64)
            seconds = time.perf_counter() - start
            err = np.abs(out - reference)
            nfe = 2 * num_steps - 1 if sampler == "heun" else num_steps
            rows.append(
                {
                    "sampler": sampler,
                    "num_steps": num_steps,
                    "nfe": nfe,
                    "max_abs_error": float(err.max()),
                    "rms_error": float(np.sqrt(np.mean(err**2))),
                    "seconds": round(seconds, 3),
                }
            )

    slopes = {}
    for sampler in ODE_SAMPLERS:
        sub = [r for r in rows if r["sampler"] == sampler]
        # Order in the number of ODE steps N - 1 (the last evaluation only denoises at t = 0).
        tail = sub[-4:]
        x = np.log([r["num_steps"] - 1 for r in tail])
        y = np.log([r["max_abs_error"] for r in tail])
        slopes[sampler] = float(-np.polyfit(x, y, 1)[0])

    header = {
        "schedule": args.schedule,
        "num_timesteps": args.num_timesteps,
        "dtype": str(diffusion.float_dtype()),
        "data": f"N({MU}, {S}^2)",
        "spacing": "linspace",
    }
    if args.format == "jsonl":
        print(json.dumps({"config": header}))
        for row in rows:
            print(json.dumps(row))
        print(json.dumps({"observed_order_last4": slopes}))
        return
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    print()
    print("| sampler | num_steps | NFE | max abs error | RMS error |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sampler']} | {r['num_steps']} | {r['nfe']} | {r['max_abs_error']:.3e} "
            f"| {r['rms_error']:.3e} |"
        )
    print()
    print("Observed order (log-log slope over the last 4 step counts, vs N - 1):")
    for sampler, slope in slopes.items():
        print(f"  {sampler}: {slope:.2f}")


if __name__ == "__main__":
    main()
