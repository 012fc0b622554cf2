"""The eval table: one row per sampler setting, one column per step count, seeds side by side."""

from __future__ import annotations

from experiments.tables import format_table


def _record(sampler, steps, fd, *, seed=0, spacing="linspace", start=0, seconds=None, **guidance):
    record = {
        "sampling": {
            "sampler": sampler,
            "num_steps": steps,
            "timestep_spacing": spacing,
            "gaussian_start_t": start,
            "seed": seed,
            **guidance,
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


def test_guided_cells_get_rows_of_their_scale_interval_and_guide():
    unguided = {"guidance_scale": 1.0, "guide": "step:500", "guidance_interval": (0.3, 5.0)}
    table = format_table(
        [
            _record("ddim", 10, 3.0, **unguided),
            _record("ddim", 10, 2.0, guidance_scale=2.0, guidance_interval=()),
            _record("ddim", 10, 1.5, guidance_scale=2.0, guidance_interval=[0.3, 5.0]),
            _record("ddim", 10, 1.2, guidance_scale=1.5, guide="step:500"),
        ],
        "fd",
    ).splitlines()
    assert table[2:] == [
        "| ddim | 3.00 |",
        "| ddim w1.5 guide step:500 | 1.20 |",
        "| ddim w2 | 2.00 |",
        "| ddim w2 (0.3, 5] | 1.50 |",
    ]


def test_sweeps_of_one_run_take_only_sampling_keys_not_set_otherwise(tmp_path):
    import pytest

    from diffusion_jax.runner.sweeps import SweepError, sampling_points

    def sweep_file(body: str) -> str:
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.py"
        path.write_text(
            "from diffusion_jax.runner.sweeps import product, sweep\n"
            f"def get_sweep():\n    return {body}\n"
        )
        return str(path)

    assert sampling_points(None) == [{}]
    reserved = ("sampling.seed", "sampling.num_steps")
    points = sampling_points(
        sweep_file(
            'product(sweep("sampling.guidance_scale", [1.5, 2.0]), '
            'sweep("sampling.guidance_interval", [(), [0.3, 5.0]]))'
        ),
        reserved,
    )
    assert points[-1] == {"sampling.guidance_scale": 2.0, "sampling.guidance_interval": (0.3, 5.0)}
    for key in ("model.ch", "sampling.seed", "sampling.num_steps"):
        with pytest.raises(SweepError, match="a sweep of one trained run takes sampling"):
            sampling_points(sweep_file(f'sweep("{key}", [1, 2])'), reserved)


def test_the_shipped_guidance_sweeps_are_sweeps_of_one_run():
    import os

    from diffusion_jax.runner.sweeps import sampling_points

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "sweeps")
    cfg = sampling_points(os.path.join(root, "guidance.py"))
    auto = sampling_points(os.path.join(root, "autoguidance.py"))
    assert (len(cfg), len(auto)) == (16, 13)
    assert {p.get("sampling.guide", "") for p in auto} == {
        "",
        "step:500",
        "step:1000",
        "posthoc_ema:0.05",
    }
