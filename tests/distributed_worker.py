"""One process of a test run: train and/or sample with the tiny digits config, dump results.

    python -m tests.distributed_worker --workdir=W --data_dir=D --out=O [--train] [--sample]
        [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0] [--num_cpu_devices=2]
        [--set training.num_train_steps=8 ...] [--fsdp 8 4]

Started by tests/test_parallel.py, with XLA_FLAGS=--xla_force_host_platform_device_count=8 for
an 8-device process, or twice with --coordinator for a 2-process run on localhost. Writes
O/params_<process>.npz (final params, keys = tree paths), O/samples_<process>.npz ('images')
and O/info_<process>.json (device and process counts, final step).

With --fsdp N [M ...] (8 devices, one process): the same, once per fsdp size, with
parallel.fsdp=N in W/fsdpN, written as O/params_fsdpN.npz, O/samples_fsdpN.npz and
O/info_fsdpN.json (which also counts the state arrays split along 'fsdp' and holds the mesh).
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from diffusion_jax import parallel  # noqa: E402
from diffusion_jax.runner import sample as sample_mode  # noqa: E402
from diffusion_jax.runner import train as train_mode  # noqa: E402
from tests.conftest import make_tiny_config  # noqa: E402  (also turns on the compile cache)


def flat_params(tree: object) -> dict[str, np.ndarray]:
    """{tree path: numpy value} of a (replicated) pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): parallel.to_host(x) for path, x in leaves}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--num_cpu_devices", type=int)
    parser.add_argument("--set", nargs="*", default=[], help="group.key=python_literal")
    parser.add_argument("--fsdp", nargs="*", type=int, default=[], help="fsdp sizes to run")
    args = parser.parse_args()

    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    config = make_tiny_config(args.data_dir)
    for assignment in args.set:
        key, value = assignment.split("=", 1)
        group, name = key.split(".")
        config[group][name] = ast.literal_eval(value)

    rank = jax.process_index()
    os.makedirs(args.out, exist_ok=True)
    if args.fsdp:
        for fsdp in args.fsdp:
            _fsdp_run(config, fsdp, os.path.join(args.workdir, f"fsdp{fsdp}"), args)
        return
    info: dict[str, object] = {
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }
    if args.train:
        state = train_mode.train(config, args.workdir)
        params = flat_params(state.params)
        np.savez(os.path.join(args.out, f"params_{rank}.npz"), **params)  # type: ignore[arg-type]
        info["step"] = int(state.step)
    info["any_process_rank1"] = parallel.any_process(rank == 1)
    info["any_process_false"] = parallel.any_process(False)
    if args.sample:
        path = sample_mode.sample(config, args.workdir)
        # Every process holds all samples after the all-gather; the chief also wrote `path`.
        if rank == 0:
            with np.load(path) as f:
                images = f["images"]
            np.savez(os.path.join(args.out, f"samples_{rank}.npz"), images=images)
    with open(os.path.join(args.out, f"info_{rank}.json"), "w") as f:
        json.dump(info, f)


def _fsdp_run(config: Any, fsdp: int, workdir: str, args: argparse.Namespace) -> None:
    """Train (and sample) `config` with parallel.fsdp=`fsdp`; write O/*_fsdp<fsdp>.*."""
    config = copy.deepcopy(config)
    config.parallel.fsdp = fsdp
    state = train_mode.train(config, workdir)
    sharded = [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if not x.sharding.is_fully_replicated
    ]
    info = {
        "device_count": jax.device_count(),
        "mesh": {str(k): int(v) for k, v in state.step.sharding.mesh.shape.items()},
        "num_sharded": len(sharded),
        "num_leaves": len(jax.tree.leaves(state)),
        "sharded_ema": sum(".ema_params" in p for p in sharded),
        "sharded_opt": sum(".opt_state" in p for p in sharded),
        "step": int(state.step),
    }
    np.savez(os.path.join(args.out, f"params_fsdp{fsdp}.npz"), **flat_params(state.params))  # type: ignore[arg-type]
    if args.sample:
        with np.load(sample_mode.sample(config, workdir)) as f:
            np.savez(os.path.join(args.out, f"samples_fsdp{fsdp}.npz"), images=f["images"])
    with open(os.path.join(args.out, f"info_fsdp{fsdp}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
