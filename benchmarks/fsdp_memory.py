"""Per-device memory and collective traffic of the train step with and without FSDP, for a pod
simulated with fake CPU devices: the step is lowered and compiled ahead of time, never run.

Usage: python -m benchmarks.fsdp_memory [--config configs/imagenet64_adm.py] [--devices 32,64]
           [--fsdp 1,8,16] [--batch-per-device 4] [--remat] [--out results.jsonl]
       python -m benchmarks.fsdp_memory --table results.jsonl    # the docs' table of a run

Each case (device count, batch per device, fsdp size dividing the count) runs in its own
subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=N). The real training step
(`runner.setup.jit_train_step` with `parallel.state_shardings` and `gather_params_fn`, as
`ModelSetup` wires it) is lowered with abstract arguments (`jax.ShapeDtypeStruct`s carrying
the shardings: nothing is allocated) and compiled; one JSON line reports

- XLA's memory analysis of the per-device program (`compiled.memory_analysis()`): arguments
  (the state shard and batch shard a device holds), temporaries (activations, gradients,
  gathered parameters), and `peak_gib` = arguments + outputs - aliased (donated) + temporaries;
- the arithmetic for the same state: `state_gib` = the exact bytes of the state shard a device
  holds under `parallel.state_shardings`, and `formula_state_gib` = 16 bytes per parameter
  (parameters, Adam's two moments, EMA; float32) / fsdp, the replicated small arrays ignored;
- every collective of the compiled per-device HLO, by kind: how many, and the bytes of their
  results per device and step (`collective_bytes`).

The program is XLA:CPU's. The state sizes follow from the shardings alone and hold on any
backend; the temporaries and collectives are those of XLA:CPU's schedule, which reduces the
gradients with all-reduces (each device then keeps its shard) where GPU and TPU compilers
usually emit reduce-scatters, and may keep more buffers alive at once than they would.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from typing import Any

from benchmarks import common, workers

GIB = 1024.0**3
# HLO element types and their sizes in bytes.
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
# `%name = <result shape(s)> <op>(` with op one of the collectives, or its async `-start` form.
_INSTRUCTION = re.compile(
    r"=\s*(?P<result>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)


def shape_bytes(text: str) -> int:
    """Total bytes of every array shape (`f32[3,3,64,128]`, ...) written in `text`."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _DTYPE_BYTES[dtype]
    return total


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {'count': n, 'bytes': b}} of the collectives in a compiled HLO module's text.

    bytes: the sum of the result shapes, i.e. per device and per execution, what an all-gather
    gathers, what a reduce-scatter leaves on each device, the buffer an all-reduce reduces. An
    async pair (`all-gather-start` / `-done`) counts once; an instruction inside a loop body
    counts once.
    """
    found: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        result = match.group("result")
        if match.group(0).rstrip("(").endswith("-start"):
            # An async start returns (operands, results[, context]); count the results only.
            shapes = _SHAPE.findall(result)
            result = " ".join(f"{d}[{s}]" for d, s in shapes[len(shapes) // 2 :])
        entry = found[match.group("op")]
        entry["count"] += 1
        entry["bytes"] += shape_bytes(result)
    return dict(found)


def shard_bytes(abstract: Any) -> int:
    """Bytes of the shard of `abstract` (ShapeDtypeStructs with shardings) one device holds."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def compile_case(config: Any, fsdp: int, batch_per_device: int) -> dict[str, Any]:
    """Compile `config`'s train step on a data x fsdp mesh over all devices; its JSON record."""
    import jax
    import jax.numpy as jnp

    from benchmarks import cases
    from diffusion_jax import checkpointing, parallel, train_state
    from diffusion_jax.runner.setup import jit_train_step

    shape = cases.image_shape(config)
    num_classes = 1000 if config.data.name.startswith("imagenet") else cases.NUM_CLASSES
    model = train_state.create_model(config.model, num_classes)
    optimizer = train_state.create_optimizer(config.training)
    mesh = parallel.create_mesh(fsdp_size=fsdp)
    shapes = jax.eval_shape(
        lambda rng: train_state.init_train_state(model, optimizer, rng, shape),
        jax.random.PRNGKey(0),
    )
    sharding = parallel.state_shardings(shapes, mesh, config.parallel.fsdp_min_size)
    state = checkpointing.abstract_like(shapes, sharding)
    batch_size = batch_per_device * mesh.size
    batch_sharding = parallel.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding),
    }
    step = train_state.make_train_step(
        model,
        cases.get_formulation(config),
        optimizer,
        config.diffusion.label_dropout,
        config.training.ema_decay,
        config.training.ema_warmup,
        gather_params=parallel.gather_params_fn(mesh),
    )
    started = time.perf_counter()
    compiled = jit_train_step(step, mesh, sharding).lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    mem = compiled.memory_analysis()
    num_params = sum(int(x.size) for x in jax.tree.leaves(shapes.params))
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "benchmark": "fsdp_memory",
        "devices": mesh.size,
        "data": mesh.size // fsdp,
        "fsdp": fsdp,
        "params": num_params,
        "batch_per_device": batch_per_device,
        "global_batch": batch_size,
        "compute_dtype": config.model.dtype,
        "remat": bool(config.model.remat),
        "compile_s": round(compile_s, 1),
        "argument_gib": round(mem.argument_size_in_bytes / GIB, 3),
        "output_gib": round(mem.output_size_in_bytes / GIB, 3),
        "alias_gib": round(mem.alias_size_in_bytes / GIB, 3),
        "temp_gib": round(mem.temp_size_in_bytes / GIB, 3),
        "peak_gib": round(peak / GIB, 3),
        "state_gib": round(shard_bytes(state) / GIB, 3),
        "formula_state_gib": round(16 * num_params / fsdp / GIB, 3),
        "collectives": {
            kind: {"count": v["count"], "gib": round(v["bytes"] / GIB, 4)}
            for kind, v in sorted(collective_bytes(compiled.as_text()).items())
        },
        "jax": jax.__version__,
    }


def markdown_table(records: list[dict[str, Any]]) -> list[str]:
    """The docs' table of `records` (GiB per device; collectives received per step)."""
    lines = [
        "| devices | data x fsdp | batch / device | remat | state (XLA) | 16 B x params / fsdp "
        "| temporaries | peak | all-gather | all-reduce | reduce-scatter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = sorted(
        records, key=lambda r: (r["remat"], r["batch_per_device"], r["devices"], r["fsdp"])
    )
    for r in order:
        c = r["collectives"]

        def gib(kind: str, c: dict[str, Any] = c) -> str:
            return f"{c[kind]['gib']:.2f} ({c[kind]['count']})" if kind in c else "-"

        lines.append(
            f"| {r['devices']} | {r['data']} x {r['fsdp']} | {r['batch_per_device']} "
            f"| {'yes' if r['remat'] else 'no'} | {r['argument_gib']:.2f} "
            f"| {r['formula_state_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} "
            f"| {gib('all-gather')} | {gib('all-reduce')} | {gib('reduce-scatter')} |"
        )
    return lines


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import cases

    config = cases.load_config(args.config)
    if args.remat:
        config.model.remat = True
    record = compile_case(config, int(args.fsdp), int(args.batch_per_device))
    record["config"] = args.config
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--config", default="configs/imagenet64_adm.py")
    parser.add_argument("--devices", default="32,64", help="comma-separated device counts")
    parser.add_argument("--fsdp", default="1,8,16", help="fsdp sizes (those dividing a count)")
    parser.add_argument("--batch-per-device", default="4", help="comma-separated batches")
    parser.add_argument("--remat", action="store_true", help="set model.remat=True")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    parser.add_argument("--table", default="", help="print the table of a JSON-lines file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return [run_child(args)]
    if args.table:
        with open(args.table) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print("\n".join(markdown_table(records)))
        return records
    records = []
    for count in [int(c) for c in args.devices.split(",")]:
        for batch in [int(b) for b in args.batch_per_device.split(",")]:
            for fsdp in [int(f) for f in args.fsdp.split(",") if count % int(f) == 0]:
                # One process per case: the fake device count is fixed per process, and each
                # compilation of a big model holds gigabytes of host memory.
                child = [f"--config={args.config}", f"--fsdp={fsdp}"]
                child += [f"--batch-per-device={batch}", *(["--remat"] if args.remat else [])]
                flags = f"--xla_force_host_platform_device_count={count}"
                record = workers.run_module("fsdp_memory", ["--child", *child], flags)
                print(json.dumps(record), flush=True)
                records.append(record)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")
    print("\n".join(markdown_table(records)))
    return records


if __name__ == "__main__":
    main()
