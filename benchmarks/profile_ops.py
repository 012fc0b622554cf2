"""Where the time goes in the U-Net on CPU: convolutions vs matmuls vs the rest.

Usage: python -m benchmarks.profile_ops [--batch-size 8] [--mode forward|train]
           [--config cifar10|digits] [--ynnpack-ops=jax|...]
           [--torch-python=/tmp/bench_torch/bin/python] [--out=benchmarks/results]

Takes every `conv_general_dilated` and `dot_general` of the traced program (the eval-mode
forward, or the whole train step as training jits it, with its backward convolutions), groups
identical ones, times
each group's op alone in a jit (median of 5 after warm-up) and multiplies by its count. The sum
against the whole program's time (measured in the same run) splits it into conv / matmul /
everything else (GroupNorm, swish, adds, concatenations, the optimizer, ...); XLA's FLOPs per op
give each group's GFLOP/s. With --torch-python the same forward convolutions (NCHW) are timed
in PyTorch in a subprocess, alternating with the JAX timings, and torch's profiler splits the
diffusers model's forward (`benchmarks.torch_peer`) by op, so the two frameworks' convolution
throughput can be compared.
"""

from __future__ import annotations

import collections
import json
import statistics
from typing import Any

from benchmarks import common, timing, workers

# Run by the torch interpreter in the repository root (so `benchmarks` imports); timing is
# standard-library only.
TORCH_SIDE = r"""
import json, sys, statistics
import torch
import torch.nn.functional as F
from benchmarks import timing
specs = json.loads(sys.stdin.read())
out = []
for s in specs:
    n, h, w, c = s["lhs"]
    kh, kw, ci, co = s["rhs"]
    x = torch.randn(n, c, h, w)
    k = torch.randn(co, ci, kh, kw)
    (ph0, ph1), (pw0, pw1) = s["padding"]
    def f():
        xp = F.pad(x, (pw0, pw1, ph0, ph1)) if (ph0, pw0) != (ph1, pw1) else x
        pad = 0 if (ph0, pw0) != (ph1, pw1) else (ph0, pw0)
        with torch.inference_mode():
            F.conv2d(xp, k, stride=tuple(s["strides"]), padding=pad)
    out.append(statistics.median(timing.timings(f, warmup=2, repeats=5)))
print(json.dumps(out))
"""

TORCH_PROFILE = r"""
import json, sys
import torch
from benchmarks import torch_peer
batch, config = int(sys.argv[1]), sys.argv[2]
model = torch_peer.build_unet(config).eval()
x = torch.randn(batch, *torch_peer.IMAGE_SHAPES[config])
t = torch.full((batch,), 500)
with torch.inference_mode():
    for _ in range(2):
        model(x, t)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(x, t)
rows = {}
for e in prof.key_averages():
    rows[e.key] = e.self_cpu_time_total / 3 / 1e6
total = sum(rows.values())
top = sorted(rows.items(), key=lambda kv: -kv[1])[:8]
print(json.dumps({"total_s": total, "top": top}))
"""


def _walk(jaxpr: Any) -> Any:
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, custom_vjp, remat, scan)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def collect_ops(closed: Any) -> dict[tuple, dict[str, Any]]:
    """Identical convs / dots grouped: key -> {'count', 'eqn'}."""
    groups: dict[tuple, dict[str, Any]] = collections.OrderedDict()
    for eqn in _walk(closed.jaxpr):
        name = eqn.primitive.name
        if name not in ("conv_general_dilated", "dot_general"):
            continue
        avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
        params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
        key = (name, avals, params)
        if key not in groups:
            groups[key] = {"count": 0, "eqn": eqn}
        groups[key]["count"] += 1
    return groups


def time_eqn(eqn: Any, compiler_options: Any = None) -> tuple[float, float | None]:
    """(median seconds, XLA FLOPs) of one equation run alone under jit."""
    import jax
    import jax.numpy as jnp

    args = [
        jax.random.normal(jax.random.key(i), v.aval.shape, v.aval.dtype)
        if jnp.issubdtype(v.aval.dtype, jnp.floating)
        else jnp.zeros(v.aval.shape, v.aval.dtype)
        for i, v in enumerate(eqn.invars)
    ]
    fn = jax.jit(lambda *a: eqn.primitive.bind(*a, **eqn.params), compiler_options=compiler_options)
    compiled = fn.lower(*args).compile()
    times = timing.timings(lambda: compiled(*args), warmup=2, repeats=5)
    return statistics.median(times), common.compiled_flops(compiled)


def conv_spec(eqn: Any) -> dict[str, Any] | None:
    """A forward NHWC/HWIO conv as a torch-timeable spec (None for backward-pass convs)."""
    p = eqn.params
    dn = p["dimension_numbers"]
    if (
        any(d != 1 for d in p["lhs_dilation"])
        or any(d != 1 for d in p["rhs_dilation"])
        or dn.lhs_spec != (0, 3, 1, 2)
        or dn.rhs_spec != (3, 2, 0, 1)
        or p["feature_group_count"] != 1
    ):
        return None
    return {
        "lhs": list(eqn.invars[0].aval.shape),
        "rhs": list(eqn.invars[1].aval.shape),
        "strides": list(p["window_strides"]),
        "padding": [list(x) for x in p["padding"]],
    }


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=("forward", "train"), default="forward")
    parser.add_argument("--config", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--torch-python", default="")
    parser.add_argument(
        "--ynnpack-ops", default=None, help="override the config's xla.cpu_ynnpack_ops ('jax', ...)"
    )
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.torch_python:
        workers.require_python(args.torch_python, "benchmarks.profile_ops --torch-python")

    import jax

    from benchmarks import cases

    b = args.batch_size
    from diffusion_jax.runner import xla_options

    config = cases.load_config(args.config, args.dtype, args.ynnpack_ops)
    options = xla_options.compiler_options(config)  # every jit below, as training and sampling
    if args.mode == "forward":
        model = cases.create_model(config)
        shape = cases.image_shape(config)
        params = cases.random_params(model, shape)
        x, _ = cases.random_inputs(b, shape)
        t = jax.numpy.full((b,), 500, jax.numpy.int32)
        fn = cases.eval_forward(model)
        call_args: tuple = (params, x, t)
        compiled = jax.jit(fn, compiler_options=options).lower(*call_args).compile()
        run_whole: Any = lambda: compiled(*call_args)
    else:
        train = cases.train_case(config, b)
        train.compile()
        fn, call_args, compiled = train.step, (train.state, train.batch), train.compiled
        run_whole = train.run  # carries the new state along: the old one is donated
    # The pure functions: a jit with compiler options cannot be traced inside another.
    groups = collect_ops(jax.make_jaxpr(fn)(*call_args))
    whole_flops = common.compiled_flops(compiled)

    torch_specs = []
    for g in groups.values():
        g["spec"] = conv_spec(g["eqn"]) if g["eqn"].primitive.name.startswith("conv") else None
        if g["spec"] is not None:
            torch_specs.append(g["spec"])

    def whole() -> float:
        return statistics.median(timing.timings(run_whole, warmup=1, repeats=3))

    # Interleave: whole program, per-op JAX, torch convs, whole program again.
    whole_before = whole()
    for g in groups.values():
        g["seconds"], g["flops"] = time_eqn(g["eqn"], options)
    torch_times: list[float] = []
    torch_profile: dict[str, Any] = {}
    if args.torch_python and torch_specs:
        torch_times = workers.run_json(
            [args.torch_python, "-c", TORCH_SIDE], workers.torch_env(), json.dumps(torch_specs)
        )
        if args.mode == "forward":
            cmd = [args.torch_python, "-c", TORCH_PROFILE, str(b), args.config]
            torch_profile = workers.run_json(cmd, workers.torch_env())
    whole_after = whole()
    whole_s = statistics.median([whole_before, whole_after])

    spec_iter = iter(torch_times)
    rows = []
    totals: collections.Counter[str] = collections.Counter()
    for (name, avals, _), g in groups.items():
        kind = "conv" if name.startswith("conv") else "dot"
        total = g["seconds"] * g["count"]
        totals[kind] += total
        row = {
            "op": kind,
            "shapes": [list(s) for s, _ in avals],
            "count": g["count"],
            "seconds_each": round(g["seconds"], 6),
            "seconds_total": round(total, 5),
            "gflops_per_s": round(g["flops"] / g["seconds"] / 1e9, 1) if g["flops"] else None,
            "forward_conv": g["spec"] is not None,
        }
        if g["spec"] is not None and torch_times:
            row["torch_seconds_each"] = round(next(spec_iter), 6)
        rows.append(row)

    env = common.environment()
    prefix = "" if args.config == "cifar10" else f"{args.config}_"  # cifar10: the old names
    routing = "" if args.ynnpack_ops is None else f"_ynnpack-{args.ynnpack_ops or 'none'}"
    stem = common.output_stem(
        args.out, f"profile_{prefix}{args.mode}_b{b}_{args.dtype}{routing.replace(',', '+')}"
    )
    summary = {
        "benchmark": "profile_ops",
        "mode": args.mode,
        "dtype": args.dtype,
        "batch_size": b,
        "xla_cpu_ynnpack_ops": config.xla.cpu_ynnpack_ops,
        "whole_s": round(whole_s, 4),
        "whole_gflops_per_s": round(whole_flops / whole_s / 1e9, 1) if whole_flops else None,
        "conv_s": round(totals["conv"], 4),
        "dot_s": round(totals["dot"], 4),
        "other_s": round(whole_s - totals["conv"] - totals["dot"], 4),
        "conv_fraction": round(totals["conv"] / whole_s, 3),
        "dot_fraction": round(totals["dot"] / whole_s, 3),
        **env,
    }
    fwd = [r for r in rows if "torch_seconds_each" in r]
    if fwd:
        jax_fwd = sum(r["seconds_each"] * r["count"] for r in fwd)
        torch_fwd = sum(r["torch_seconds_each"] * r["count"] for r in fwd)
        summary["forward_convs_jax_s"] = round(jax_fwd, 4)
        summary["forward_convs_torch_s"] = round(torch_fwd, 4)
        summary["forward_convs_torch_over_jax"] = round(torch_fwd / jax_fwd, 3)
    if torch_profile:
        summary["torch_profile"] = torch_profile
    common.write_jsonl(stem + ".jsonl", summary)
    lines = [
        f"# Per-op breakdown, {args.config} U-Net {args.mode}, batch {b}, {args.dtype}",
        "",
        f"jax {env['jax']}, {env['device_kind']}; XLA:CPU ops handed to YNNPACK "
        f"(`xla.cpu_ynnpack_ops`): {config.xla.cpu_ynnpack_ops!r}; load average "
        f"{env['load_avg_1m']}. Whole "
        f"program {whole_s:.3f} s; convolutions {totals['conv']:.3f} s "
        f"({100 * totals['conv'] / whole_s:.0f}%), dot_general {totals['dot']:.3f} s "
        f"({100 * totals['dot'] / whole_s:.0f}%), rest "
        f"{whole_s - totals['conv'] - totals['dot']:.3f} s (sum of ops timed alone; fusion "
        "makes the rest approximate).",
        "",
        "| op | input shapes | count | s each | s total | GFLOP/s | torch s each | torch/JAX |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: -r["seconds_total"]):
        common.write_jsonl(stem + ".jsonl", {"benchmark": "profile_op", **r})
        ts = r.get("torch_seconds_each")
        ratio = "-" if ts is None else f"{ts / r['seconds_each']:.2f}"
        lines.append(
            f"| {r['op']} | {' x '.join(str(tuple(s)) for s in r['shapes'])} | {r['count']} | "
            f"{r['seconds_each']:.5f} | {r['seconds_total']:.4f} | {r['gflops_per_s']} | "
            f"{'-' if ts is None else f'{ts:.5f}'} | "
            f"{ratio} |"
        )
    if fwd:
        lines += [
            "",
            f"Forward convolutions alone: JAX {summary['forward_convs_jax_s']:.3f} s, torch "
            f"{summary['forward_convs_torch_s']:.3f} s (torch/JAX "
            f"{summary['forward_convs_torch_over_jax']:.2f}; > 1: JAX faster).",
        ]
    if torch_profile:
        top = ", ".join(f"{k} {v:.3f} s" for k, v in torch_profile["top"])
        lines += [
            "",
            f"torch profiler, diffusers forward ({torch_profile['total_s']:.3f} s): {top}",
        ]
    common.write_markdown(stem, lines)


if __name__ == "__main__":
    main()
