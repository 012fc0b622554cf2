"""XLA:CPU flag sets vs the default on the CIFAR-10 U-Net forward, measured interleaved.

Usage: python -m benchmarks.xla_flags [--rounds 3] [--batch-size 8] [--runs 5]

Each flag set runs benchmarks.unet_forward in its own subprocess (XLA_FLAGS is read once per
process), the sets alternating for `--rounds` rounds (`timing.interleaved`); the table gives
each set's median forward time and its speedup over the default measured in the same round
(median over rounds). The sets: XNNPACK for convolutions and dots
(`xla_cpu_experimental_xnn_fusion_type`), the same through YNNPACK (`..._ynn_fusion_type`,
which jax 0.10 already uses for some convolutions), oneDNN, and fast math. Prints one JSON line
per run and a Markdown table.
"""

from __future__ import annotations

import json
import os
import statistics

from benchmarks import common, timing, workers

FLAG_SETS = {
    "default": "",
    "xnn_conv_dot": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot",
    "ynn_conv_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",
    "onednn": "--xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution,individual_dot",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sets", default=",".join(FLAG_SETS))
    args = parser.parse_args(argv)
    names = args.sets.split(",")
    loads = []

    forward_args = [f"--batch-size={args.batch_size}", f"--runs={args.runs}"]

    def measure(name: str) -> float:
        record = workers.run_module("unet_forward", forward_args, FLAG_SETS[name])
        record.update(flag_set=name, xla_flags=FLAG_SETS[name])
        print(json.dumps(record), flush=True)
        loads.append(os.getloadavg()[0])
        return float(record["median_s"])

    times = timing.interleaved(measure, names, args.rounds)
    base = times.get("default")
    print(
        f"\nCIFAR-10 U-Net forward, batch {args.batch_size}; load average "
        f"{min(loads):.1f}-{max(loads):.1f}\n\n| flag set | median s | speedup vs default |\n"
        "| --- | --- | --- |"
    )
    for name in names:
        speed = timing.ratios(base, times[name])["median"] if base else None
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | "
            f"{'-' if speed is None else f'{speed:.2f}x'} |"
        )


if __name__ == "__main__":
    main()
