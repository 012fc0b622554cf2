"""`--mode=visualize`: pictures of the forward and reverse processes of a trained run.

visualize_mode(config, workdir)  workdir/visualize/forward_strip.png, reverse_<...>.{png,gif}
"""

from __future__ import annotations

import io

import jax
import ml_collections
import numpy as np

from diffusion_jax import visualize
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.edit import load_for_edit, source_images

# Columns of the forward strip: this many timesteps evenly spaced over [0, T - 1].
FORWARD_STRIP_COLUMNS = 10
# Columns of the reverse strip: this many evenly spaced model evaluations.
REVERSE_STRIP_COLUMNS = 10


def visualize_mode(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> list[str]:
    """Pictures of the forward and reverse processes of the run in `workdir`.

    visualize/forward_strip.png: the first edit.num_images images of edit.split noised to
    FORWARD_STRIP_COLUMNS levels evenly spaced along the formulation's time axis, from the clean
    image to its top level (one row each; `Formulation.fraction_sigma`).
    visualize/reverse_<sampler><steps>_seed<seed>.png: edit.num_images samples drawn with
    config.sampling, rows x_t / x0 prediction at REVERSE_STRIP_COLUMNS evenly spaced model
    evaluations; .gif: one frame per model evaluation (x_t above, x0 prediction below).
    Class-conditional models sample the labels of `ModelSetup.labels_fn`.
    Returns [forward png, reverse png, reverse gif].
    """
    run = load_for_edit(config, workdir, allow_config_change, "visualize")
    x0, _ = source_images(config)
    spec = run.sampler_spec()
    rng = jax.random.PRNGKey(config.edit.seed)
    fractions = np.linspace(0.0, 1.0, FORWARD_STRIP_COLUMNS)
    sigmas = [run.formulation.fraction_sigma(u, spec.sigma_max) for u in fractions]
    forward = visualize.forward_strip_levels(
        run.formulation, x0, sigmas, jax.random.fold_in(rng, 1)
    )

    num = config.edit.num_images
    labels_fn = run.setup.labels_fn()
    labels = None if labels_fn is None else labels_fn(np.arange(num))
    frames = visualize.reverse_frames(
        run.model_fn(), run.formulation, (num, *x0.shape[1:]), rng, labels=labels, spec=spec
    )
    name = f"reverse_{spec.tag}_seed{config.edit.seed}"
    paths = [
        workdir_lib.contained_path(workdir, "visualize", file_name)
        for file_name in ("forward_strip.png", name + ".png", name + ".gif")
    ]
    if workdir_lib.is_chief():
        workdir_lib.write_png(paths[0], forward, scale=_scale(forward))
        strip = visualize.trajectory_strip(frames, num_columns=REVERSE_STRIP_COLUMNS)
        workdir_lib.write_png(paths[1], strip, scale=_scale(strip))
        gif = io.BytesIO()
        visualize.save_gif(gif, visualize.gif_frames(frames))
        workdir_lib.atomic_write_bytes(paths[2], gif.getvalue())
    return paths


def _scale(image: np.ndarray) -> int:
    """Nearest-neighbour enlargement that brings the longer side to about 512 pixels."""
    return max(1, 512 // max(image.shape[:2]))
