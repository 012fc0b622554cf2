r"""Print a Markdown table (sampler x steps) of the eval results in a workdir.

    python -m experiments.eval_table --workdir=workdirs/digits [--metric=fd]

Reads every `<workdir>/eval/*.json` written by `--mode=eval` (see `make digits-table`); cells
show the metric and, in brackets, the sampling time per 1000 samples.
"""

from __future__ import annotations

from absl import app, flags

from diffusion_jax.analysis import load_eval_results
from experiments.tables import format_table

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_METRIC = flags.DEFINE_string("metric", "fd", "Metric to tabulate (a key of 'metrics').")
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    del argv
    print(format_table(load_eval_results(_WORKDIR.value), _METRIC.value))


if __name__ == "__main__":
    app.run(main)
