"""Can a 3x3 convolution be lowered faster than XLA:CPU's own convolution? One table per shape.

Usage: python -m benchmarks.conv_lowering [--config cifar10|digits] [--rounds 3] [--out=...]

For the 3x3 stride-1 convolution shapes of the U-Net (`--config`: the CIFAR-10 one at batch 8,
or the digits one at batch 128) times, interleaved, the forward and the forward + backward
(gradients of input and kernel) of four lowerings that compute the same function:

  xla       `lax.conv_general_dilated` (what flax's Conv runs), XLA's own backward
  im2col    the 9 shifted copies concatenated along channels, then one matmul
  shifted   9 matmuls of shifted copies, summed
  xla+vjp   XLA's forward; backward by hand: input gradient as a forward convolution with the
            flipped, transposed kernel, kernel gradient as im2col(x)^T @ dy (one matmul)

Each is checked against `xla` (relative error printed) before it is timed. The ratio is xla's
time over the lowering's (> 1: the lowering is faster), median over rounds. This decides, per
shape and per CPU, whether a lowering other than XLA's is worth selecting (issue #15).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, timing

_DN = ("NHWC", "HWIO", "NHWC")
# (H = W, C_in, C_out) of the 3x3 stride-1 convolutions of each config's U-Net (up-path inputs
# are concatenations, hence C_in = 384, 512 or 96), and the batch the comparisons use.
SHAPES = {
    "cifar10": (8, [(32, 128, 128), (32, 256, 128), (16, 256, 256), (16, 512, 256),
                    (8, 256, 256), (8, 512, 256), (4, 256, 256), (4, 512, 256)]),
    "digits": (128, [(8, 32, 32), (8, 64, 32), (8, 96, 32), (4, 64, 64), (4, 128, 64)]),
}  # fmt: skip


def xla_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=_DN)


def _shifted(x: jax.Array) -> list[jax.Array]:
    """The 9 copies of x shifted by the kernel's offsets (zero padding), in HWIO order."""
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]


def im2col_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.concatenate(_shifted(x), -1) @ k.reshape(-1, k.shape[-1])


def shifted_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    kernels = k.reshape(9, k.shape[2], k.shape[3])
    return sum((s @ kernels[i] for i, s in enumerate(_shifted(x))), jnp.zeros(()))


@jax.custom_vjp
def vjp_conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return xla_conv(x, k)


def _vjp_fwd(x: jax.Array, k: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return xla_conv(x, k), (x, k)


def _vjp_bwd(res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, k = res
    dx = xla_conv(dy, jnp.flip(k, (0, 1)).swapaxes(2, 3))
    cols = jnp.concatenate(_shifted(x), -1).reshape(-1, 9 * x.shape[-1])
    dk = (cols.T @ dy.reshape(-1, dy.shape[-1])).reshape(k.shape)
    return dx, dk


vjp_conv.defvjp(_vjp_fwd, _vjp_bwd)
LOWERINGS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "xla": xla_conv,
    "im2col": im2col_conv,
    "shifted": shifted_conv,
    "xla+vjp": vjp_conv,
}


def _relative_error(a: Any, b: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(p)))
        for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _grad_of(f: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Gradients (input, kernel) of sum(f(x, k)^2): the forward plus the whole backward."""
    return jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1))


def _interleaved_medians(
    cases: dict[tuple[str, str], Any], inputs: tuple[jax.Array, ...], rounds: int, repeats: int
) -> dict[tuple[str, str], float]:
    """case -> median over interleaved rounds of each round's median time of `repeats` calls."""

    def measure(case: tuple[str, str]) -> float:
        fn = cases[case]
        return statistics.median(timing.timings(lambda: fn(*inputs), warmup=1, repeats=repeats))

    got = timing.interleaved(measure, list(cases), rounds)
    return {case: statistics.median(times) for case, times in got.items()}


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--config", choices=tuple(SHAPES), default="cifar10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=common.RESULTS)
    args = parser.parse_args(argv)
    batch, shapes = SHAPES[args.config]
    stem = common.output_stem(args.out, f"conv_lowering-{args.config}")
    env = {"benchmark": "environment", **common.environment()}
    common.write_jsonl(stem + ".jsonl", env)
    names = [n for n in LOWERINGS if n != "xla"]
    lines = [
        f"# 3x3 convolution lowerings on XLA:CPU, {args.config} U-Net shapes, batch {batch}",
        "",
        f"jax {env['jax']} on {env['device_kind']} ({env['cpu_count']} CPUs). Ratio = xla's "
        "median time / the lowering's (> 1: faster than XLA's convolution); medians of "
        f"{args.rounds} interleaved rounds of {args.repeats} timed calls.",
        "",
        "| HxW | C_in | C_out | xla fwd ms | xla fwd+bwd ms | "
        + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names)
        + " |",
        "| --- " * (5 + 2 * len(names)) + "|",
    ]
    rng = np.random.default_rng(0)
    for hw, c_in, c_out in shapes:
        x = jnp.asarray(rng.standard_normal((batch, hw, hw, c_in)), jnp.float32)
        k = jnp.asarray(0.05 * rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)

        cases = {}
        for name, f in LOWERINGS.items():
            cases[(name, "fwd")] = jax.jit(f)
            cases[(name, "fwd+bwd")] = jax.jit(_grad_of(f))
        for name in names:
            for part in ("fwd", "fwd+bwd"):
                err = _relative_error(cases[("xla", part)](x, k), cases[(name, part)](x, k))
                if err > 1e-4:
                    raise AssertionError(f"{name} {part} differs from xla: relative error {err}")

        med = _interleaved_medians(cases, (x, k), args.rounds, args.repeats)
        for (name, part), seconds in med.items():
            record = dict(shape=[batch, hw, hw, c_in, c_out], lowering=name, part=part)
            common.write_jsonl(stem + ".jsonl", {**record, "median_s": seconds})
        cells = [f"{med[('xla', 'fwd')] * 1e3:.2f}", f"{med[('xla', 'fwd+bwd')] * 1e3:.2f}"]
        for name in names:
            for part in ("fwd", "fwd+bwd"):
                cells.append(f"{med[('xla', part)] / med[(name, part)]:.2f}x")
        lines.append(f"| {hw}x{hw} | {c_in} | {c_out} | " + " | ".join(cells) + " |")
    common.write_markdown(stem, lines)


if __name__ == "__main__":
    main()
