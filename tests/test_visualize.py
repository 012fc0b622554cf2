"""Pictures of the forward and reverse processes, GIF writing, and --mode=visualize on a tiny
trained digits run."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageSequence

from diffusion_jax import images, samplers, schedules, visualize
from diffusion_jax.runner import visualize as visualize_mode
from diffusion_jax.testing import gaussian_oracle

SCH = schedules.get_schedule("cosine", 100)
MODEL = gaussian_oracle.optimal_model(SCH, 0.0, 0.5)


def _digit_like(batch: int = 2) -> np.ndarray:
    x = -np.ones((batch, 8, 8, 1), np.float32)
    x[:, 2:6, 3:5] = 1.0
    return x


def test_forward_strip_shows_each_image_noised_more_to_the_right() -> None:
    x0 = _digit_like(2)
    ts = [0, 30, 60, 99]
    strip = visualize.forward_strip(SCH, x0, ts, jax.random.key(0))
    assert strip.dtype == np.uint8 and strip.shape == (2 * 9 + 1, 4 * 9 + 1, 1)
    tiles = np.stack(
        [strip[1 + r * 9 : r * 9 + 9, 1 + c * 9 : c * 9 + 9] for r in range(2) for c in range(4)]
    ).reshape(2, 4, 8, 8, 1)
    clean = images.to_uint8(x0).astype(float)
    dist = np.abs(tiles.astype(float) - clean[:, None]).mean(axis=(0, 2, 3, 4))
    assert dist[0] < 5  # t = 0 is nearly clean (ab_0 ~ 1)
    assert np.all(np.diff(dist) > 0)
    # One image (H, W, C) gives one row.
    assert visualize.forward_strip(SCH, x0[0], ts, jax.random.key(0)).shape[0] == 10


def test_forward_strip_rejects_timesteps_outside_the_schedule() -> None:
    with pytest.raises(ValueError, match="timesteps must lie in \\[0, 99\\]"):
        visualize.forward_strip(SCH, _digit_like(), [0, 100], jax.random.key(0))
    with pytest.raises(ValueError, match="x0 must be"):
        visualize.forward_strip(SCH, np.zeros((8, 8)), [0], jax.random.key(0))


@pytest.mark.parametrize(("sampler", "evals"), [("ddim", 6), ("heun", 11)])
def test_reverse_frames_record_every_model_evaluation(sampler: str, evals: int) -> None:
    rng = jax.random.key(2)
    options = {"sampler": sampler, "num_steps": 6, "timestep_spacing": "linspace"}
    frames = visualize.reverse_frames(MODEL, SCH, (3, 8, 8, 1), rng, **options)
    assert frames.x_t.shape == frames.x0_pred.shape == (evals, 3, 8, 8, 1)
    assert frames.timesteps.shape == (evals,) and frames.timesteps[0] == 99
    direct = samplers.sample(MODEL, SCH, (3, 8, 8, 1), rng, **options)
    np.testing.assert_allclose(frames.samples, np.asarray(direct), atol=2e-4)  # jit vs eager
    np.testing.assert_allclose(frames.x0_pred[-1], frames.samples, atol=1e-5)


def test_trajectory_strip_has_an_x_t_and_an_x0_row_per_sample() -> None:
    frames = visualize.reverse_frames(
        MODEL, SCH, (2, 8, 8, 1), jax.random.key(0), sampler="ddim", num_steps=12
    )
    strip = visualize.trajectory_strip(frames, num_columns=5)
    assert strip.shape == (4 * 9 + 1, 5 * 9 + 1, 1)
    # The last column's x0 row is the final sample.
    last_x0 = strip[1 + 9 : 9 + 9, 1 + 4 * 9 : 4 * 9 + 9]
    np.testing.assert_array_equal(last_x0, images.to_uint8(frames.samples)[0])
    np.testing.assert_array_equal(visualize.evenly_spaced(12, 5), [0, 3, 6, 8, 11])
    np.testing.assert_array_equal(visualize.evenly_spaced(3, 10), [0, 1, 2])


def test_gif_has_one_frame_per_model_evaluation_and_is_upscaled(tmp_path: Any) -> None:
    frames = visualize.reverse_frames(
        MODEL, SCH, (4, 8, 8, 1), jax.random.key(1), sampler="ddpm", num_steps=7
    )
    stack = visualize.gif_frames(frames)
    assert stack.shape == (7, 2 * 9 + 1, 4 * 9 + 1, 1)
    path = str(tmp_path / "reverse.gif")
    visualize.save_gif(path, stack, scale=4, duration_ms=50, last_frame_ms=500)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (4 * 37, 4 * 19)
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    assert durations == [50] * 6 + [500]


def test_save_gif_rejects_frames_it_cannot_write(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="frames must be uint8"):
        visualize.save_gif(str(tmp_path / "a.gif"), np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="frames is empty"):
        visualize.save_gif(str(tmp_path / "a.gif"), np.zeros((0, 8, 8, 3), np.uint8))


@pytest.mark.slow
def test_visualize_mode_writes_strips_and_a_gif(
    trained_tiny_run: tuple[str, ml_collections.ConfigDict],
) -> None:
    workdir, config = trained_tiny_run
    config.edit.num_images = 2
    paths = visualize_mode.visualize_mode(config, workdir)
    forward, reverse, gif = paths
    assert all(p.startswith(os.path.join(workdir, "visualize")) for p in paths)
    for path in (forward, reverse):
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
    with Image.open(gif) as image:
        assert image.format == "GIF"
        # One frame per model evaluation of the config's sampler (dpm_solver++2m_sde, 4 steps).
        assert image.n_frames == config.sampling.num_steps
    assert os.path.basename(gif) == "reverse_dpm_solverpp2m_sde4_seed0.gif"
