"""Shared helpers of the benchmark scripts: timing, XLA cost/memory analysis, environment info.

Not a test module. The machine's speed drifts under outside load, so every comparison in these
scripts is taken as a ratio of numbers measured in one run, alternating the things compared.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runnable as `python benchmarks/<script>.py` from a checkout without installing.
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Nominal peaks used for MFU. CPU: the figure for this 2-core machine (float32, FMA);
# each run also measures a large matmul (`measure_matmul_gflops`) as the practical ceiling.
CPU_F32_PEAK_GFLOPS = 190.0
H100_BF16_DENSE_PEAK_GFLOPS = 989_000.0
H100_F32_PEAK_GFLOPS = 67_000.0  # non-tensor-core FP32, SXM


def timings(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Wall times (s) of `repeats` calls of `fn` after `warmup` untimed ones; `fn` must block."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median / min / max of a list of wall times, rounded for the JSON lines."""
    return {
        "median_s": round(statistics.median(times), 5),
        "min_s": round(min(times), 5),
        "max_s": round(max(times), 5),
        "repeats": len(times),
    }


def compiled_flops(compiled: Any) -> float | None:
    """Total FLOPs XLA's cost analysis reports for a compiled program (None if none).

    A `while` loop (lax.scan) body is counted once, not times its trip count.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returned one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def compiled_memory_mb(compiled: Any) -> dict[str, float]:
    """XLA's static buffer sizes (MiB) for a compiled program: arguments, outputs, temporaries."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return {}
    if mem is None:
        return {}
    mib = 1024.0**2
    return {
        "xla_argument_mb": round(mem.argument_size_in_bytes / mib, 1),
        "xla_output_mb": round(mem.output_size_in_bytes / mib, 1),
        "xla_temp_mb": round(mem.temp_size_in_bytes / mib, 1),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Measures the peak memory of the block: the device's peak_bytes_in_use where jax reports
    it (GPU/TPU), else the process RSS high-water above the RSS at entry, polled every 2 ms
    (ru_maxrss cannot be reset between cases)."""
    import jax

    out: dict[str, float] = {}
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        yield out
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_mb"] = round(stats.get("peak_bytes_in_use", 0) / 1024.0**2, 1)
        return
    start = _rss_bytes()
    peak = [start]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["peak_rss_delta_mb"] = round((peak[0] - start) / 1024.0**2, 1)


def measure_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved float32 GFLOP/s of an n x n @ n x n jitted matmul (median): the practical
    compute ceiling of this device at the moment of the run."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    times = timings(lambda: f(a, b).block_until_ready(), warmup=2, repeats=repeats)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def peak_gflops(dtype: str) -> tuple[float, str]:
    """(nominal peak GFLOP/s, its description) for MFU on the current backend and dtype."""
    import jax

    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "gpu" and "H100" in kind:
        if dtype == "bfloat16":
            return H100_BF16_DENSE_PEAK_GFLOPS, "H100 bf16 dense 989 TFLOP/s"
        return H100_F32_PEAK_GFLOPS, "H100 f32 (no tensor cores) 67 TFLOP/s"
    return CPU_F32_PEAK_GFLOPS, "CPU f32 190 GFLOP/s (issue #8, 2 cores)"


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_jsonl(path: str | None, record: dict[str, Any]) -> None:
    """Print one JSON line and append it to `path` (if given)."""
    line = json.dumps(record)
    print(line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
