"""The one timing helper of the benchmarks: warm-up, blocking, repeats, interleaved rounds.

The machine's speed drifts under outside load, so a comparison is only taken between numbers
measured close together: `interleaved` alternates the things compared round by round (the
order flipping every round) and `ratios` divides them within each round.

Standard library only (jax is imported only to block on a result that is not None), so the
torch peer, which runs in an environment without jax, times its side with the same code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
K = TypeVar("K")


def block(result: Any) -> Any:
    """Waits for a (pytree of) jax array(s); None (what torch callables return) passes through.

    jax dispatch is asynchronous: without this a timer measures the enqueueing only.
    """
    if result is not None:
        import jax

        jax.block_until_ready(result)
    return result


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(result, wall seconds) of one call of `fn`, blocking on the result."""
    t0 = time.perf_counter()
    result = block(fn())
    return result, time.perf_counter() - t0


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """(compiled program, seconds to lower and compile it) of a jitted function on `args`."""
    return timed(lambda: jitted.lower(*args).compile())


def timings(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones, each call blocked
    on its result."""
    for _ in range(warmup):
        block(fn())
    return [timed(fn)[1] for _ in range(repeats)]


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min, max and spread ((max - min) / median) of wall times, for the JSON lines."""
    median = statistics.median(times)
    return {
        "median_s": round(median, 5),
        "min_s": round(min(times), 5),
        "max_s": round(max(times), 5),
        "spread": round((max(times) - min(times)) / median, 3) if median > 0 else 0.0,
        "repeats": len(times),
    }


def round_order(names: Sequence[K], round_index: int) -> list[K]:
    """`names` in order on even rounds, reversed on odd ones: neither side always goes first
    (and so always runs on a cache or a load level the other left)."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def interleaved(measure: Callable[[K], T], names: Sequence[K], num_rounds: int) -> dict[K, list[T]]:
    """`measure(name)` for every name, round-robin for `num_rounds` rounds: name -> one
    measurement per round (e.g. a median of `timings`, or a number from a subprocess)."""
    out: dict[K, list[T]] = {name: [] for name in names}
    for r in range(num_rounds):
        for name in round_order(names, r):
            out[name].append(measure(name))
    return out


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """Median, min and max over rounds of numerator / denominator taken within each round
    (e.g. base seconds / variant seconds = the variant's speedup)."""
    per_round = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
    }
