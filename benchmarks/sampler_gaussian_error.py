"""Discretisation error of the deterministic samplers on Gaussian data, vs the number of steps.

For data x0 ~ N(mu, s^2) per pixel the optimal eps model is closed form and the probability-flow
ODE from x_T at t = T-1 to t = 0 is affine, so the error of `samplers.sample` against the exact
solution (followed by the optimal denoiser, as the samplers end) is pure discretisation error.
Prints one row per (sampler, num_steps) and the fitted log-log slope (the observed order).

Rows: 'dpm_solver++' is the default (lower_order_final=True: the update onto t = 0 is first
order); 'dpm_solver++ (2M final)' is pure 2M (lower_order_final=False). The first-order final
step's error has the opposite sign to the rest, so dpm_solver++'s error crosses zero as N grows
(near N = 41 for 'linear', between 21 and 31 for 'cosine'): a slope fitted across that crossing
is not an order (flagged in the output); the slope over the last 3 step counts is printed too.
In exact arithmetic the error is affine in x_T, err = offset + gain * x_T (both columns, fitted
by least squares), so max abs error = |offset| + 3 |gain| over x_T in [-3, 3] (float32 rounding
adds a little, e.g. heun on 'cosine'); the flag is a sign change of the gain, the dominant term.

    python -m benchmarks.sampler_gaussian_error [--formulation=ddpm|edm|flow]
        [--schedule=linear] [--num_timesteps=1000] [--steps=6,11,21,41,81,161,321]
        [--spacing=linspace] [--format=markdown|jsonl] [--x64]

--formulation picks the model (ddpm on --schedule with an eps network; edm; flow), each with its
optimal network (`gaussian_oracle.optimal_net`), started at x_vp in [-3, 3] on the grid's
first level. heun needs a finite first level: on flow use --spacing=karras.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, timing
from diffusion_jax import diffusion, formulations, samplers, schedules
from diffusion_jax.testing import gaussian_oracle

MU, S = 0.3, 0.5
# Row name -> (sampler, extra keyword arguments of samplers.sample).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("ddim", {}),
    "dpm_solver++": ("dpm_solver++", {"lower_order_final": True}),
    "dpm_solver++ (2M final)": ("dpm_solver++", {"lower_order_final": False}),
    "dpm_solver++3m": ("dpm_solver++3m", {"lower_order_final": True}),
    "dpm_solver++3m (3M final)": ("dpm_solver++3m", {"lower_order_final": False}),
    "heun": ("heun", {}),
    "unipc": ("unipc", {}),
}


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--formulation", choices=("ddpm", "edm", "flow"), default="ddpm")
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--num_timesteps", type=int, default=1000)
    parser.add_argument("--steps", default="6,11,21,41,81,161,321")
    parser.add_argument("--spacing", default="linspace", help="sampling.timestep_spacing")
    parser.add_argument("--format", choices=("markdown", "jsonl"), default="markdown")
    parser.add_argument("--x64", action="store_true", help="run in float64")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", args.x64)

    sch = schedules.get_schedule(args.schedule, args.num_timesteps)
    formulation = {
        "ddpm": formulations.DDPM(sch),
        "edm": formulations.EDM(),
        "flow": formulations.Flow(),
    }[args.formulation]
    steps = [int(n) for n in args.steps.split(",")]
    x_start = np.linspace(-3.0, 3.0, 256).reshape(4, 64)  # +-3 std of N(0, I)
    model = gaussian_oracle.optimal_net(formulation, MU, S)

    rows: list[dict[str, Any]] = []
    for name, (sampler, kwargs) in VARIANTS.items():
        for num_steps in steps:
            spec = samplers.SamplerSpec.create(
                sampler=sampler,
                num_steps=num_steps,
                clip_x0=False,
                timestep_spacing=args.spacing,
                **kwargs,
            )
            sigmas = spec.grid(formulation)
            reference = gaussian_oracle.exact_solution(
                x_start, float(sigmas[0]), float(sigmas[-1]), MU, S
            )
            # x_init is in the formulation's own coordinates (x_vp for ddpm).
            x_init = jnp.asarray(x_start * float(formulation.scale(sigmas[0])))
            # One call, tracing included: a rough cost column, not a speed benchmark.
            call = functools.partial(
                spec.sample, model, formulation, x_start.shape, jax.random.key(0), x_init=x_init
            )
            out, seconds = timing.timed(call)
            out = np.asarray(out, np.float64)
            signed = out - reference
            gain, offset = np.polyfit(x_start.ravel(), signed.ravel(), 1)
            err = np.abs(signed)
            nfe = spec.num_evaluations
            rows.append(
                {
                    "sampler": name,
                    "num_steps": num_steps,
                    "nfe": nfe,
                    "max_abs_error": float(err.max()),
                    "rms_error": float(np.sqrt(np.mean(err**2))),
                    "error_offset": float(offset),
                    "error_gain": float(gain),
                    "seconds": round(seconds, 3),
                }
            )

    def fitted_order(tail: list[dict[str, Any]]) -> float:
        # Order in the number of ODE steps N - 1 (the last evaluation only denoises at t = 0).
        x = np.log([r["num_steps"] - 1 for r in tail])
        y = np.log([r["max_abs_error"] for r in tail])
        return float(-np.polyfit(x, y, 1)[0])

    slopes, slopes3, sign_changes = {}, {}, {}
    for name in VARIANTS:
        sub = [r for r in rows if r["sampler"] == name]
        slopes[name], slopes3[name] = fitted_order(sub[-4:]), fitted_order(sub[-3:])
        # A zero crossing of the signed error inside (or just before) the 4-point fit.
        signs = np.sign([r["error_gain"] for r in sub[-5:]])
        sign_changes[name] = bool(np.any(signs != signs[-1]))

    header = {
        "formulation": args.formulation,
        "schedule": args.schedule,
        "num_timesteps": args.num_timesteps,
        "dtype": str(diffusion.float_dtype()),
        "data": f"N({MU}, {S}^2)",
        "spacing": args.spacing,
    }
    if args.format == "jsonl":
        print(json.dumps({"config": header}))
        for row in rows:
            print(json.dumps(row))
        fits = {"order_last4": slopes, "order_last3": slopes3, "sign_change_in_fit": sign_changes}
        print(json.dumps(fits))
        return
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    print()
    print("| sampler | num_steps | NFE | max abs error | RMS error | error offset | error gain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sampler']} | {r['num_steps']} | {r['nfe']} | {r['max_abs_error']:.3e} "
            f"| {r['rms_error']:.3e} | {r['error_offset']:+.2e} | {r['error_gain']:+.2e} |"
        )
    print()
    print("Observed order (log-log slope vs N - 1 over the last 4 / last 3 step counts):")
    for name, slope in slopes.items():
        note = "  (signed error changes sign near the 4-point fit: not an order)"
        print(f"  {name}: {slope:.2f} / {slopes3[name]:.2f}{note if sign_changes[name] else ''}")


if __name__ == "__main__":
    main()
