"""JAX vs PyTorch (diffusers) on the DDPM CIFAR-10 U-Net, measured interleaved in one run.

Usage (from the repository root, with this project's environment):

    python -m benchmarks.compare_torch [--torch-python=/tmp/bench_torch/bin/python]
        [--rounds 3] [--batch-size 8] [--config cifar10|digits] [--ynnpack-ops=jax|...]
        [--out=benchmarks/results]

Starts two long-lived workers (`benchmarks.workers`), this module with --jax-worker and
`benchmarks.torch_peer --serve` in the torch environment (see that module), each of which
builds its model once, then alternates
them case by case for `--rounds` rounds (the order flips every round): train step (forward,
backward, Adam, clipping), one denoising forward, and the whole DDIM-50 sampler, all float32 at
the same batch. The machine's speed drifts under outside load; a ratio is taken only between
the two measurements of a pair, and the table reports the median over rounds of those ratios
(JAX images/s / torch images/s, > 1 means JAX is faster). The JAX side compiles with the
config's `xla.cpu_ynnpack_ops`, as training and sampling do; `--ynnpack-ops` overrides it
(`jax`: jax's own routing). Writes <out>/<date>-torch.{jsonl,md}.

The torch worker runs with OMP_WAIT_POLICY=PASSIVE unless told otherwise: on a shared machine
(load average above the core count) torch's default, spinning OpenMP threads, made its denoising
step 3-4x slower here (10-16 s instead of 3-3.8 s at batch 8, load ~8), which would flatter JAX;
on an idle machine the policy makes little difference (`workers.torch_env`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchmarks import common, timing, workers

BENCHMARKS = ("train_step", "denoise_step", "sampler")
TITLES = {"cifar10": "CIFAR-10", "digits": "digits"}


class JaxPeer:
    """The JAX side of the comparison, compiled once; `run` mirrors torch_peer.Peer.run."""

    def __init__(
        self,
        batch_size: int,
        dtype: str = "float32",
        ddim_steps: int = 50,
        config: str = "cifar10",
        ynnpack_ops: str | None = None,
    ) -> None:
        import jax
        import jax.numpy as jnp

        from benchmarks import cases
        from diffusion_jax import samplers

        self.batch, self.dtype, self.ddim_steps, self.config = batch_size, dtype, ddim_steps, config
        t0 = time.perf_counter()
        self.train = cases.train_case(cases.load_config(config, dtype, ynnpack_ops), batch_size)
        self.train.compile()
        forward = cases.eval_forward(self.train.model)
        self.params = jax.tree.map(jnp.copy, self.train.state.ema_params)
        self.x = jnp.asarray(self.train.batch["image"])
        self.t = jnp.full((batch_size,), 500, jnp.int32)
        # Compiled with the config's routing (`xla.cpu_ynnpack_ops`), as its sampler runs.
        self.ynnpack_ops = self.train.config.xla.cpu_ynnpack_ops
        cfg = self.train.config
        self.forward = cases.jit(cfg, forward).lower(self.params, self.x, self.t).compile()
        spec = samplers.SamplerSpec(sampler="ddim", num_steps=ddim_steps)
        shape = self.x.shape

        def generate(params: Any, rng: jax.Array) -> jax.Array:
            return spec.sample(
                lambda x, t: forward(params, x, t), self.train.formulation, shape, rng
            )

        self.rng = jax.random.PRNGKey(0)
        self.sample = cases.jit(cfg, generate).lower(self.params, self.rng).compile()
        self.setup_s = time.perf_counter() - t0
        self.num_params = cases.num_params(self.params)

    def _call(self, benchmark: str) -> Any:
        if benchmark == "train_step":
            return self.train.run()
        if benchmark == "denoise_step":
            return self.forward(self.params, self.x, self.t)
        return self.sample(self.params, self.rng)

    def run(self, benchmark: str, repeats: int, warmup: int = 1) -> dict[str, Any]:
        return workers.peer_record(
            benchmark,
            "jax",
            timing.timings(lambda: self._call(benchmark), warmup=warmup, repeats=repeats),
            config=self.config,
            dtype=self.dtype,
            batch_size=self.batch,
            params=self.num_params,
            ddim_steps=self.ddim_steps,
        )


def serve_jax(args: argparse.Namespace) -> None:
    peer = JaxPeer(args.batch_size, args.dtype, args.ddim_steps, args.config, args.ynnpack_ops)
    env = {"benchmark": "environment", **common.environment(), "framework": "jax"}
    env.update(config=peer.config, params=peer.num_params, setup_s=round(peer.setup_s, 1))
    env.update(xla_cpu_ynnpack_ops=peer.ynnpack_ops)
    workers.serve(env, peer.run)


def markdown(pairs: dict[str, list[tuple[dict, dict]]], envs: dict[str, dict], note: str) -> str:
    jax_env, torch_env = envs["jax"], envs["torch"]
    lines = [
        f"# JAX vs PyTorch/diffusers, DDPM {TITLES.get(jax_env['config'])} U-Net (float32, CPU)",
        "",
        f"jax {jax_env['jax']} on {jax_env['device_kind']} ({jax_env['cpu_count']} CPUs); "
        f"torch {torch_env['torch']} ({torch_env['torch_threads']} threads), diffusers "
        f"{torch_env['diffusers']}. Parameters: jax {jax_env['params']:,}, torch "
        f"{torch_env['params']:,}. XLA:CPU ops handed to YNNPACK (`xla.cpu_ynnpack_ops`): "
        f"{jax_env.get('xla_cpu_ynnpack_ops', 'jax')!r}. {note}",
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
        ratio = timing.ratios(
            [t["median_s"] for _, t in rounds], [j["median_s"] for j, _ in rounds]
        )
        jax_s = statistics.median(j["median_s"] for j, _ in rounds)
        torch_s = statistics.median(t["median_s"] for _, t in rounds)
        batch = rounds[0][0]["batch_size"]
        loads = [r["load_avg_1m"] for pair in rounds for r in pair]
        label = names.get(bench, f"DDIM-{rounds[0][0].get('num_steps')} (whole sampler)")
        lines.append(
            f"| {label} | {batch} | {jax_s:.3f} | {torch_s:.3f} | {batch / jax_s:.2f} | "
            f"{batch / torch_s:.2f} | {ratio['median']:.2f}x | "
            f"{ratio['min']:.2f}-{ratio['max']:.2f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
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
    parser.add_argument("--config", choices=("cifar10", "digits"), default="cifar10")
    parser.add_argument("--ddim-steps", type=int, default=50, help="steps of the sampler case")
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype")
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    parser.add_argument(
        "--ynnpack-ops", default=None, help="override the config's xla.cpu_ynnpack_ops ('jax', ...)"
    )
    parser.add_argument("--out", default=common.RESULTS)
    parser.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jax_worker:
        return serve_jax(args)

    workers.require_python(args.torch_python, "benchmarks.compare_torch --torch-python")
    # torch first: a broken torch environment fails in seconds, before the JAX compiles.
    torch_peer = workers.torch_peer(
        args.torch_python,
        config=args.config,
        batch_size=args.batch_size,
        ddim_steps=args.ddim_steps,
        omp_wait_policy=args.torch_omp_wait_policy,
    )
    jax_args = [f"--batch-size={args.batch_size}", f"--config={args.config}"]
    jax_args += [f"--ddim-steps={args.ddim_steps}", f"--dtype={args.dtype}"]
    if args.ynnpack_ops is not None:
        jax_args.append(f"--ynnpack-ops={args.ynnpack_ops}")
    jax_peer = workers.Worker(
        [sys.executable, "-m", "benchmarks.compare_torch", "--jax-worker", *jax_args]
    )
    peers = {"jax": jax_peer, "torch": torch_peer}
    envs = {k: w.env for k, w in peers.items()}
    stem = common.output_stem(
        args.out, "torch" if args.config == "cifar10" else f"torch-{args.config}"
    )
    for env in envs.values():
        common.write_jsonl(stem + ".jsonl", env)
    benches = args.benchmarks.split(",")
    pairs: dict[str, list[tuple[dict, dict]]] = {b: [] for b in benches}
    load_start = os.getloadavg()[0]
    for rnd in range(args.rounds):
        for bench in benches:
            if bench == "sampler" and rnd >= args.sampler_rounds:
                continue  # minutes per run on CPU
            # The whole sampler takes tens of seconds: one timed run per round and no warm-up
            # (the denoising-step case before it has warmed the same model up).
            repeats = 1 if bench == "sampler" else 3
            warmup = 0 if bench == "sampler" else 1
            order = timing.round_order(["jax", "torch"], rnd)
            got = {side: peers[side].run(bench, repeats, warmup) for side in order}
            for side in order:
                common.write_jsonl(stem + ".jsonl", {**got[side], "round": rnd})
            pairs[bench].append((got["jax"], got["torch"]))
    for w in peers.values():
        w.close()
    policy = args.torch_omp_wait_policy or "default (active)"
    note = (
        f"torch OMP_WAIT_POLICY: {policy}. Load average (1 min) at start {load_start:.1f}, "
        f"at end {os.getloadavg()[0]:.1f}."
    )
    table = markdown(pairs, envs, note)
    common.write_markdown(stem, [table])


if __name__ == "__main__":
    main()
