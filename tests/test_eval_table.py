"""The eval table: one row per sampler setting, one column per step count, seeds side by side."""

from __future__ import annotations

from experiments.tables import format_table


def _record(sampler, steps, fd, *, seed=0, spacing="linspace", start=0, seconds=None):
    record = {
        "sampling": {
            "sampler": sampler,
            "num_steps": steps,
            "timestep_spacing": spacing,
            "gaussian_start_t": start,
            "seed": seed,
        },
        "metrics": {"fd": fd},
    }
    if seconds:
        record["seconds_per_1000_samples"] = seconds
    return record


def test_rows_separate_spacings_and_gaussian_starts_and_cells_list_seeds_in_order():
    table = format_table(
        [
            _record("ddpm", 20, 2.393, seconds=12.0),
            _record("ddpm", 20, 3.139, seed=1),
            _record("heun", 20, 5.0, spacing="karras"),
            _record("heun", 10, 7.0, spacing="karras", start=800),
            _record("heun", 20, 99.0),
        ],
        "fd",
    ).splitlines()
    assert table[0] == "| sampler | 10 steps | 20 steps |"
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert rows["ddpm"] == "| ddpm |  | 2.39 (12 s) / 3.14 |"
    assert rows["heun karras"] == "| heun karras |  | 5.00 |"
    assert rows["heun karras gs800"] == "| heun karras gs800 | 7.00 |  |"
    assert rows["heun"] == "| heun |  | 99.00 |"


def test_records_without_the_metric_or_the_sampler_are_left_out():
    table = format_table([{"sampling": {}, "metrics": {"fd": 1.0}}, _record("ddim", 5, None)], "fd")
    assert table.splitlines()[2:] == []
