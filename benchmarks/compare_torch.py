"""JAX vs PyTorch (diffusers) on the DDPM CIFAR-10 U-Net, measured interleaved in one run.

Usage (from the repository root, with this project's environment):

    python benchmarks/compare_torch.py [--torch-python=/tmp/bench_torch/bin/python]
        [--rounds 3] [--batch-size 8] [--out=benchmarks/results]

Starts two long-lived workers, this file with --jax-worker and benchmarks/torch_peer.py --serve
(the torch environment: see that file), each of which builds its model once, then alternates
them case by case for `--rounds` rounds (the order flips every round): train step (forward,
backward, Adam, clipping), one denoising forward, and the whole DDIM-50 sampler, all float32 at
the same batch. The machine's speed drifts under outside load; a ratio is taken only between
the two measurements of a pair, and the table reports the median over rounds of those ratios
(JAX images/s / torch images/s, > 1 means JAX is faster). Writes <out>/<date>-torch.{jsonl,md}.

The torch worker runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise: on a shared machine
(load average above the core count) torch's default, spinning OpenMP threads, made its denoising
step 3-4x slower here (10-16 s instead of 3-3.8 s at batch 8, load ~8), which would flatter JAX;
on an idle machine the policy makes little difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import IO, Any

import common  # first: puts the repository on sys.path

BENCHMARKS = ("train_step", "denoise_step", "sampler")


class JaxPeer:
    """The JAX side of the comparison, compiled once; `run` mirrors torch_peer.Peer.run."""

    def __init__(self, batch_size: int, dtype: str = "float32", ddim_steps: int = 50) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import run as suite

        from diffusion_jax import parallel, samplers, schedules, train_state

        self.batch, self.dtype, self.ddim_steps = batch_size, dtype, ddim_steps
        config = suite.load_config("cifar10", dtype)
        shape = suite.image_shape(config)
        model = train_state.create_model(config.model, None)
        schedule = schedules.get_schedule(
            config.diffusion.schedule, num_timesteps=config.diffusion.num_timesteps
        )
        optimizer = train_state.create_optimizer(config.training)
        mesh = parallel.create_mesh()
        replicated = parallel.replicated_sharding(mesh)
        t0 = time.perf_counter()
        self.state = jax.jit(
            lambda rng: train_state.init_train_state(model, optimizer, rng, shape),
            out_shardings=replicated,
        )(jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        self.data = parallel.global_batch(
            {
                "image": rng.uniform(-1, 1, (batch_size, *shape)).astype(np.float32),
                "label": np.zeros(batch_size, np.int32),
            },
            mesh,
        )
        self.train = (
            jax.jit(
                train_state.make_train_step(
                    model, schedule, optimizer, config.diffusion, config.training.ema_decay
                ),
                in_shardings=(replicated, parallel.batch_sharding(mesh)),
                out_shardings=(replicated, replicated),
                donate_argnums=0,
            )
            .lower(self.state, self.data)
            .compile()
        )

        def apply(params: Any, x: jax.Array, t: jax.Array) -> jax.Array:
            return model.apply({"params": params}, x, t, train=False)

        self.params = jax.tree.map(jnp.copy, self.state.ema_params)
        self.x = jnp.asarray(self.data["image"])
        self.t = jnp.full((batch_size,), 500, jnp.int32)
        self.forward = jax.jit(apply).lower(self.params, self.x, self.t).compile()

        def generate(params: Any, rng: jax.Array) -> jax.Array:
            return samplers.sample(
                lambda x, t: apply(params, x, t),
                schedule,
                (batch_size, *shape),
                rng,
                sampler="ddim",
                num_steps=ddim_steps,
            )

        self.rng = jax.random.PRNGKey(0)
        self.sample = jax.jit(generate).lower(self.params, self.rng).compile()
        self.setup_s = time.perf_counter() - t0
        self.num_params = sum(int(p.size) for p in jax.tree.leaves(self.params))

    def _call(self, benchmark: str) -> None:
        import jax

        if benchmark == "train_step":
            self.state, metrics = self.train(self.state, self.data)
            jax.block_until_ready((self.state, metrics))
        elif benchmark == "denoise_step":
            self.forward(self.params, self.x, self.t).block_until_ready()
        else:
            self.sample(self.params, self.rng).block_until_ready()

    def run(self, benchmark: str, repeats: int, warmup: int = 1) -> dict[str, Any]:
        times = common.timings(lambda: self._call(benchmark), warmup=warmup, repeats=repeats)
        record: dict[str, Any] = {
            "benchmark": benchmark,
            "framework": "jax",
            "config": "cifar10",
            "dtype": self.dtype,
            "batch_size": self.batch,
            "params": self.num_params,
            **common.summarize(times),
        }
        if benchmark == "sampler":
            record.update(sampler="ddim", num_steps=self.ddim_steps)
            record["denoise_steps_per_s"] = round(self.ddim_steps / record["median_s"], 3)
        record["images_per_s"] = round(self.batch / record["median_s"], 3)
        record["load_avg_1m"] = round(os.getloadavg()[0], 2)
        return record


def serve_jax(batch_size: int, dtype: str) -> None:
    peer = JaxPeer(batch_size, dtype)
    env = {**common.environment(), "framework": "jax", "params": peer.num_params}
    env["setup_s"] = round(peer.setup_s, 1)
    print(json.dumps({"benchmark": "environment", **env}), flush=True)
    for line in sys.stdin:
        if line.strip():
            name, repeats, warmup = line.split()
            print(json.dumps(peer.run(name, int(repeats), int(warmup))), flush=True)


class Worker:
    """A benchmark worker process answering `<benchmark> <repeats> <warmup>` with JSON."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=common.REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.env = self._read()

    def _read(self) -> dict[str, Any]:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        for line in out:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")

    def run(self, benchmark: str, repeats: int, warmup: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{benchmark} {repeats} {warmup}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def markdown(pairs: dict[str, list[tuple[dict, dict]]], envs: dict[str, dict], note: str) -> str:
    jax_env, torch_env = envs["jax"], envs["torch"]
    lines = [
        "# JAX vs PyTorch/diffusers, DDPM CIFAR-10 U-Net (float32, CPU)",
        "",
        f"jax {jax_env['jax']} on {jax_env['device_kind']} ({jax_env['cpu_count']} CPUs); "
        f"torch {torch_env['torch']} ({torch_env['torch_threads']} threads), diffusers "
        f"{torch_env['diffusers']}. Parameters: jax {jax_env['params']:,}, torch "
        f"{torch_env['params']:,}. {note}",
        "",
        "Each round runs JAX and torch back to back (order alternating); ratio = JAX images/s "
        "/ torch images/s of the same round, median over rounds (min-max).",
        "",
        "| case | batch | JAX median s | torch median s | JAX img/s | torch img/s | ratio | "
        "ratio min-max | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"train_step": "train step", "denoise_step": "denoising step (1 fwd)"}
    for bench, rounds in pairs.items():
        if not rounds:
            continue
        ratios = [t["median_s"] / j["median_s"] for j, t in rounds]
        jax_s = statistics.median(j["median_s"] for j, _ in rounds)
        torch_s = statistics.median(t["median_s"] for _, t in rounds)
        batch = rounds[0][0]["batch_size"]
        loads = [r["load_avg_1m"] for pair in rounds for r in pair]
        label = names.get(bench, f"DDIM-{rounds[0][0].get('num_steps')} (whole sampler)")
        lines.append(
            f"| {label} | {batch} | {jax_s:.3f} | {torch_s:.3f} | {batch / jax_s:.2f} | "
            f"{batch / torch_s:.2f} | {statistics.median(ratios):.2f}x | "
            f"{min(ratios):.2f}-{max(ratios):.2f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", default="/tmp/bench_torch/bin/python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--sampler-rounds", type=int, default=1, help="rounds that include the whole sampler"
    )
    parser.add_argument(
        "--torch-omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the torch worker ('' = torch's default, active spinning)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    parser.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"))
    parser.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_worker:
        return serve_jax(args.batch_size, args.dtype)

    here = os.path.dirname(os.path.abspath(__file__))
    torch_env = {**os.environ}
    torch_env.pop("OMP_WAIT_POLICY", None)
    if args.torch_omp_wait_policy:
        torch_env["OMP_WAIT_POLICY"] = args.torch_omp_wait_policy
    workers = {
        "jax": Worker(
            [
                sys.executable,
                os.path.join(here, "compare_torch.py"),
                "--jax-worker",
                f"--batch-size={args.batch_size}",
                f"--dtype={args.dtype}",
            ]
        ),
        "torch": Worker(
            [
                args.torch_python,
                os.path.join(here, "torch_peer.py"),
                "--serve",
                f"--batch-size={args.batch_size}",
            ],
            env=torch_env,
        ),
    }
    envs = {k: w.env for k, w in workers.items()}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-torch")
    if os.path.exists(stem + ".jsonl"):
        os.remove(stem + ".jsonl")
    for env in envs.values():
        common.write_jsonl(stem + ".jsonl", env)
    benches = args.benchmarks.split(",")
    pairs: dict[str, list[tuple[dict, dict]]] = {b: [] for b in benches}
    load_start = os.getloadavg()[0]
    for rnd in range(args.rounds):
        order = ["jax", "torch"] if rnd % 2 == 0 else ["torch", "jax"]
        for bench in benches:
            if bench == "sampler" and rnd >= args.sampler_rounds:
                continue  # minutes per run on CPU
            # The whole sampler takes tens of seconds: one timed run per round and no warm-up
            # (the denoising-step case before it has warmed the same model up).
            repeats = 1 if bench == "sampler" else 3
            warmup = 0 if bench == "sampler" else 1
            got = {side: workers[side].run(bench, repeats, warmup) for side in order}
            for side in order:
                common.write_jsonl(stem + ".jsonl", {**got[side], "round": rnd})
            pairs[bench].append((got["jax"], got["torch"]))
    for w in workers.values():
        w.close()
    policy = args.torch_omp_wait_policy or "default (active)"
    note = (
        f"torch OMP_WAIT_POLICY: {policy}. Load average (1 min) at start {load_start:.1f}, "
        f"at end {os.getloadavg()[0]:.1f}."
    )
    table = markdown(pairs, envs, note)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
