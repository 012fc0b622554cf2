"""What the benchmarks report besides times: XLA's FLOPs and buffer sizes, peak memory, the
measured matmul ceiling, the environment, and JSON lines. Timing is `benchmarks.timing`, peaks
for MFU `benchmarks.peaks`, the models and train step `benchmarks.cases`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


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
    times = timing.timings(lambda: f(a, b), warmup=2, repeats=repeats)
    return 2.0 * n**3 / statistics.median(times) / 1e9


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


def output_stem(out: str, name: str) -> str:
    """`<out>/<today>[-<name>]` (no extension), the directory created and a previous run's
    `.jsonl` of the same day removed: each run rewrites its files, `write_jsonl` appends."""
    os.makedirs(out, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = os.path.join(out, f"{date}-{name}" if name else date)
    if os.path.exists(stem + ".jsonl"):
        os.remove(stem + ".jsonl")
    return stem


def argument_parser(file: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark module's parser: usage as `python -m benchmarks.<module>`, and the module's
    docstring (its usage and what it measures) as the --help text."""
    name = os.path.splitext(os.path.basename(file))[0]
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def write_markdown(stem: str, lines: list[str], *, echo: bool = True) -> None:
    """Writes `<stem>.md` (rewritten each run) and prints it (`echo`)."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    with open(stem + ".md", "w") as f:
        f.write(text)
    if echo:
        print(text, end="", flush=True)
