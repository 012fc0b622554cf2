"""The Markdown table of eval results shared by experiments.eval_table and sampler_table."""

from __future__ import annotations


def _row_label(sampling: dict, grid: str | None) -> str:
    """sampler, then the grid it used (or the configured spacing), the Gaussian start and the
    guidance (scale, interval, guide) where not the defaults."""
    label = sampling["sampler"]
    spacing = grid or sampling.get("timestep_spacing") or "linspace"
    if spacing != "linspace":
        label += f" {spacing}"
    if sampling.get("gaussian_start_t", 0):
        label += f" gs{sampling['gaussian_start_t']}"
    if sampling.get("gaussian_start_sigma", 0):
        label += f" gss{sampling['gaussian_start_sigma']:g}"
    if sampling.get("guidance_scale", 1.0) != 1.0:
        label += f" w{sampling['guidance_scale']:g}"
        if interval := sampling.get("guidance_interval"):
            label += f" ({interval[0]:g}, {interval[1]:g}]"
        if guide := sampling.get("guide"):
            label += f" guide {guide}"
    return label


def format_table(results: list[dict], metric: str) -> str:
    """Markdown rows: one per sampler (with its spacing and Gaussian start), one column per step
    count; a cell shows the metric of each sample seed (seed 0 first, '/'-separated) and, in
    brackets, the sampling time per 1000 samples of the first."""
    cells: dict[tuple[str, int], dict[int, str]] = {}
    for record in results:
        sampling = record.get("sampling", {})
        value = record.get("metrics", {}).get(metric)
        if value is None or "sampler" not in sampling:
            continue
        seconds = record.get("seconds_per_1000_samples")
        timing = f" ({seconds:.0f} s)" if seconds else ""
        key = (_row_label(sampling, record.get("grid")), int(sampling["num_steps"]))
        cells.setdefault(key, {})[int(sampling.get("seed", 0))] = f"{value:.2f}{timing}"
    labels = sorted({label for label, _ in cells})
    steps = sorted({n for _, n in cells})
    lines = [
        "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for label in labels:
        row = []
        for n in steps:
            by_seed = cells.get((label, n), {})
            values = [by_seed[seed] for seed in sorted(by_seed)]
            # Timing only for the first seed: the others were sampled the same way.
            row.append(
                " / ".join([values[0], *(v.split(" (")[0] for v in values[1:])]) if values else ""
            )
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)
