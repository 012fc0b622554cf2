r"""Print a Markdown table (sampler x steps) of the eval results in a workdir.

    python -m experiments.eval_table --workdir=workdirs/digits [--metric=fd]

Reads every `<workdir>/eval/*.json` written by `--mode=eval` (see `make digits-table`); cells
show the metric and, in brackets, the sampling time per 1000 samples.
"""

from __future__ import annotations

from absl import app, flags

from diffusion_jax.analysis import load_eval_results

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_METRIC = flags.DEFINE_string("metric", "fd", "Metric to tabulate (a key of 'metrics').")
flags.mark_flag_as_required("workdir")


def format_table(results: list[dict], metric: str) -> str:
    """Markdown rows: one per sampler, one column per step count."""
    cells: dict[tuple[str, int], str] = {}
    for record in results:
        sampling = record.get("sampling", {})
        value = record.get("metrics", {}).get(metric)
        if value is None or "sampler" not in sampling:
            continue
        seconds = record.get("seconds_per_1000_samples")
        timing = f" ({seconds:.0f} s)" if seconds else ""
        cells[(sampling["sampler"], int(sampling["num_steps"]))] = f"{value:.2f}{timing}"
    samplers = sorted({s for s, _ in cells})
    steps = sorted({n for _, n in cells})
    lines = [
        "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for sampler in samplers:
        row = [cells.get((sampler, n), "") for n in steps]
        lines.append(f"| {sampler} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    print(format_table(load_eval_results(_WORKDIR.value), _METRIC.value))


if __name__ == "__main__":
    app.run(main)
