"""Long-lived benchmark worker processes and the records they answer with.

A comparison with PyTorch runs each framework in its own process (torch lives in another
environment than this project): each worker builds its model once, then answers commands
`<benchmark> <repeats> <warmup>` on stdin with one JSON line, so the driver can alternate the
two sides case by case without paying set-up twice. Standard library only: the torch peer
imports this module in an environment without jax.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

from benchmarks import common, timing


def require_python(path: str, what: str) -> None:
    """Exits with one line unless `path` is an interpreter that can be started."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)) and not shutil.which(path):
        sys.exit(
            f"{what}: no interpreter at {path!r}; create the torch environment first "
            "(`python -m benchmarks.torch_peer --help`) or pass its python."
        )


def torch_env(omp_wait_policy: str = "PASSIVE") -> dict[str, str]:
    """The environment of a torch process: OpenMP threads that sleep rather than spin when idle.

    On a shared machine (load above the core count) torch's default, spinning threads, made its
    denoising step 3-4x slower here, which would flatter JAX; on an idle machine the policy
    makes little difference. '' keeps torch's default.
    """
    env = {**os.environ}
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def peer_record(
    benchmark: str,
    framework: str,
    times: list[float],
    *,
    config: str,
    dtype: str,
    batch_size: int,
    params: int,
    ddim_steps: int,
) -> dict[str, Any]:
    """The JSON record of one timed case, the same fields from either framework."""
    record: dict[str, Any] = {
        "benchmark": benchmark,
        "framework": framework,
        "config": config,
        "dtype": dtype,
        "batch_size": batch_size,
        "params": params,
        **timing.summarize(times),
    }
    if benchmark == "sampler":
        record.update(sampler="ddim", num_steps=ddim_steps)
        record["denoise_steps_per_s"] = round(ddim_steps / record["median_s"], 3)
    record["images_per_s"] = round(batch_size / record["median_s"], 3)
    record["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return record


def serve(
    environment: dict[str, Any],
    run: Callable[[str, int, int], dict[str, Any]],
    commands: Iterable[str] = sys.stdin,
) -> None:
    """The worker side: prints `environment`, then `run(benchmark, repeats, warmup)` as one JSON
    line per command (warmup defaults to 1)."""
    print(json.dumps(environment), flush=True)
    for line in commands:
        if line.strip():
            name, repeats, *warmup = line.split()
            print(json.dumps(run(name, int(repeats), int(warmup[0]) if warmup else 1)), flush=True)


class Worker:
    """The driver side: a worker process answering `<benchmark> <repeats> <warmup>` with JSON.

    `env` is its first line (what it runs on). Started in the repository root, so `cmd` may
    run `-m benchmarks.<module>`.
    """

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd, cwd=common.REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.env = self._read()

    def _read(self) -> dict[str, Any]:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        for line in out:
            if line.startswith("{"):
                return json.loads(line)
        # Its own error (e.g. torch_peer's missing torch) is on stderr, above this line.
        sys.exit(f"benchmarks worker {' '.join(self.cmd)} exited with {self.proc.wait()}")

    def run(self, benchmark: str, repeats: int, warmup: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{benchmark} {repeats} {warmup}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_json(cmd: list[str], env: dict[str, str], stdin: str | None = None) -> Any:
    """Runs `cmd` to completion in the repository root; the JSON of its last stdout line."""
    proc = subprocess.run(
        cmd, input=stdin, env=env, cwd=common.REPO, capture_output=True, text=True
    )
    if proc.returncode:  # its traceback, then one line saying which command failed
        sys.stderr.write(proc.stderr)
        sys.exit(f"benchmarks: {' '.join(cmd[:4])} ... exited with {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_module(module: str, args: list[str], xla_flags: str) -> dict[str, Any]:
    """Runs `python -m benchmarks.<module> *args` in a fresh process with XLA_FLAGS (which XLA
    reads once per process) and returns the JSON of its last stdout line."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    return run_json(cmd, {**os.environ, "XLA_FLAGS": xla_flags})


def torch_peer(
    python: str,
    *,
    config: str,
    batch_size: int,
    ddim_steps: int = 50,
    omp_wait_policy: str = "PASSIVE",
) -> Worker:
    """`benchmarks.torch_peer --serve` started with the torch environment's `python`."""
    cmd = [python, "-m", "benchmarks.torch_peer", "--serve", f"--config={config}"]
    cmd += [f"--batch-size={batch_size}", f"--ddim-steps={ddim_steps}"]
    return Worker(cmd, env=torch_env(omp_wait_policy))
