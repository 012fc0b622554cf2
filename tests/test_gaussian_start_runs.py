"""The Gaussian start on a trained run: the train split's Gaussian is fitted once, stored in the
workdir and used by the sample mode and the notebook API."""

from __future__ import annotations

import os

import numpy as np
import pytest

from diffusion_jax.data import pipeline
from diffusion_jax.runner import loading
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner.setup import DATA_GAUSSIAN_FILE, ModelSetup


def test_data_gaussian_is_fitted_on_the_train_split_and_stored_with_the_run(trained_tiny_run):
    workdir, config = trained_tiny_run
    gaussian = ModelSetup(config).data_gaussian(workdir)
    images, _ = pipeline.eval_images(config.data, config.data.train_split)
    flat = pipeline.to_float(images).reshape(len(images), -1).astype(np.float64)
    np.testing.assert_allclose(gaussian.mean, flat.mean(0), atol=1e-12)
    cov = gaussian.eigvecs @ np.diag(gaussian.eigvals) @ gaussian.eigvecs.T
    np.testing.assert_allclose(cov, np.cov(flat, rowvar=False, bias=True), atol=1e-10)
    # Stored: a new setup reads the file instead of refitting (a changed file shows through).
    path = os.path.join(workdir, DATA_GAUSSIAN_FILE)
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["mean"] = arrays["mean"] + 1.0
    np.savez(path, **arrays)
    np.testing.assert_allclose(ModelSetup(config).data_gaussian(workdir).mean, flat.mean(0) + 1.0)


def test_random_flip_fits_the_split_and_its_mirror_images(trained_tiny_run):
    _, config = trained_tiny_run
    config.data.random_flip = True
    gaussian = ModelSetup(config).data_gaussian()
    mean = gaussian.mean.reshape(8, 8, 1)
    np.testing.assert_allclose(mean, mean[:, ::-1], atol=1e-12)  # symmetric under the flip


@pytest.mark.slow
def test_sample_mode_with_a_gaussian_start_writes_images_and_the_stored_gaussian(
    trained_tiny_run,
):
    workdir, config = trained_tiny_run
    config.sampling.update(
        sampler="dpm_solver++", num_steps=5, gaussian_start_t=70, num_samples=6, batch_size=6
    )
    path = sample_mode.sample(config, workdir)
    with np.load(path) as data:
        images = data["images"]
    assert images.shape == (6, 8, 8, 1)
    assert os.path.exists(os.path.join(workdir, DATA_GAUSSIAN_FILE))
    # The notebook API samples the same images (per-sample seeds, the same stored Gaussian).
    run = loading.load_run(workdir, config=config)
    x = run.sample(6, seed=config.sampling.seed)
    expected = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    # Without the start, other images: the start is not ignored.
    y = run.sample(6, seed=config.sampling.seed, gaussian_start_t=0)
    assert np.abs(x - y).max() > 0.05
