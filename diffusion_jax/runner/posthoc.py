"""`--mode=posthoc_ema`: reconstruct the EMA of any relative length from a run's snapshots.

    posthoc_ema_mode(config, workdir) -> <workdir>/posthoc_ema/sigma_rel<s>.npz (and .json)

with s = `posthoc_ema.sigma_rel`, at the step of the newest snapshot. The snapshots' tracked
power-function EMAs (`training.posthoc_ema_sigma_rels`, written every
`training.posthoc_ema_every` steps) are combined with the least-squares coefficients of
`posthoc_ema.reconstruction_coefficients`, one snapshot file at a time, in float64. Sample or
evaluate the result with `--config.sampling.params=posthoc_ema:<s>`. See docs/posthoc_ema.md.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import posthoc_ema
from diffusion_jax.errors import NoCheckpointError
from diffusion_jax.runner import ema_snapshots, validation
from diffusion_jax.runner import workdir as workdir_lib
from diffusion_jax.runner.setup import ModelSetup

VALIDATORS = (*validation.MODEL_VALIDATORS, validation.check_posthoc_ema)


def posthoc_ema_mode(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> str:
    """Write the reconstruction with `config.posthoc_ema.sigma_rel`; returns its .npz path.

    Refuses, before reading any parameters: an invalid sigma_rel (`ConfigError`), a workdir
    without snapshots or with snapshots of a single step (`NoCheckpointError`, naming the
    training flag), and a config whose model differs from the run's (`check_saved_config`).
    """
    validation.validate(config, jax.device_count(), VALIDATORS)
    sigma_rel = float(config.posthoc_ema.sigma_rel)
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    steps = ema_snapshots.snapshot_steps(workdir)
    fix = (
        "train with --config.training.posthoc_ema_every=N (N > 0, e.g. a tenth of the run or "
        "less) and the same --workdir"
    )
    if not steps:
        raise NoCheckpointError(
            f"no post-hoc EMA snapshots in {ema_snapshots.snapshot_dir(workdir)}; {fix}"
        )
    if len(steps) < 2:
        raise NoCheckpointError(
            f"only one post-hoc EMA snapshot (step {steps[0]}) in "
            f"{ema_snapshots.snapshot_dir(workdir)}: a reconstruction needs snapshots of "
            f"several steps; train longer, or {fix}"
        )
    validation.check_saved_config(config, workdir, allow_config_change)
    npz, _ = ema_snapshots.params_paths(workdir, sigma_rel)  # contained, before any work
    validation.check_workdir_writable(workdir, ema_snapshots.DIRECTORY)
    setup = ModelSetup(config)
    template = setup.abstract_state.ema_params

    # One profile per (snapshot, tracked EMA), in file order.
    profiles = [
        (step, i, float(g))
        for step in steps
        for i, g in enumerate(ema_snapshots.read_snapshot_profiles(workdir, step)[1])
    ]
    profile_steps = np.array([p[0] for p in profiles], np.float64)
    profile_gammas = np.array([p[2] for p in profiles], np.float64)
    target_step = steps[-1]
    coefficients = posthoc_ema.reconstruction_coefficients(
        profile_steps, profile_gammas, target_step, gamma
    )
    error = posthoc_ema.reconstruction_error(
        profile_steps, profile_gammas, coefficients, target_step, gamma
    )
    logging.info(
        "Post-hoc EMA sigma_rel=%g (gamma %.3f) at step %d from %d snapshots x %d EMAs; "
        "relative L2 error of the reconstructed profile %.2e",
        sigma_rel,
        gamma,
        target_step,
        len(steps),
        len(profiles) // len(steps),
        error,
    )

    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), template)
    k = 0
    for step in steps:
        path = ema_snapshots.snapshot_path(workdir, step)
        with workdir_lib.load_npz(path) as stored:
            num = len(stored["gammas"])
            for i in range(num):
                ema = ema_snapshots.unflatten(
                    stored, total, f"ema{i}/", source=f"post-hoc EMA snapshot {path}"
                )
                x = coefficients[k]
                total = jax.tree.map(lambda acc, e, x=x: acc + x * e.astype(np.float64), total, ema)
                k += 1
    params = jax.tree.map(lambda acc, like: acc.astype(like.dtype), total, template)
    record = {
        "step": target_step,
        "sigma_rel": sigma_rel,
        "gamma": gamma,
        "profile_error": error,
        "snapshots": [
            {"step": int(s), "gamma": float(g), "coefficient": float(c)}
            for s, g, c in zip(profile_steps, profile_gammas, coefficients, strict=True)
        ],
    }
    ema_snapshots.write_params(workdir, sigma_rel, params, record)
    if workdir_lib.is_chief():
        logging.info("Wrote %s", npz)
    return npz
