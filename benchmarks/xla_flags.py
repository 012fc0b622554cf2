"""XLA:CPU flag sets vs the default on the CIFAR-10 U-Net forward, measured interleaved.

Usage: python benchmarks/xla_flags.py [--rounds 3] [--batch-size 8] [--runs 5]

Each flag set runs benchmarks/unet_forward.py in its own subprocess (XLA_FLAGS is read once per
process), the sets alternating for `--rounds` rounds; the table gives each set's median forward
time and its speedup over the default measured in the same round (median over rounds). The
sets: XNNPACK for convolutions and dots (`xla_cpu_experimental_xnn_fusion_type`), the same
through YNNPACK (`..._ynn_fusion_type`, which jax 0.10 already uses for some convolutions), oneDNN,
and fast math. Prints one JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import common  # first: puts the repository on sys.path

FLAG_SETS = {
    "default": "",
    "xnn_conv_dot": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution,individual_dot",
    "ynn_conv_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",
    "onednn": "--xla_cpu_use_onednn=true "
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution,individual_dot",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sets", default=",".join(FLAG_SETS))
    args = parser.parse_args(argv)
    names = args.sets.split(",")
    script = os.path.join(common.REPO, "benchmarks", "unet_forward.py")
    times: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for _ in range(args.rounds):
        for name in names:
            env = {**os.environ, "XLA_FLAGS": FLAG_SETS[name]}
            out = subprocess.run(
                [sys.executable, script, f"--batch-size={args.batch_size}", f"--runs={args.runs}"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            record = json.loads(out.strip().splitlines()[-1])
            record.update(flag_set=name, xla_flags=FLAG_SETS[name])
            print(json.dumps(record), flush=True)
            times[name].append(record["median_s"])
            loads.append(os.getloadavg()[0])
    base = times["default"] if "default" in times else None
    print(
        f"\nCIFAR-10 U-Net forward, batch {args.batch_size}; load average "
        f"{min(loads):.1f}-{max(loads):.1f}\n\n| flag set | median s | speedup vs default |\n"
        "| --- | --- | --- |"
    )
    for name in names:
        speed = (
            statistics.median(b / t for b, t in zip(base, times[name], strict=True))
            if base
            else None
        )
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | "
            f"{'-' if speed is None else f'{speed:.2f}x'} |"
        )


if __name__ == "__main__":
    main()
