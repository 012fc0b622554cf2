"""The digits job in the EDM formulation (Karras et al. 2022): the U-Net, batch, steps, learning
rate and EMA of configs/digits.py, trained with EDM's preconditioning, lognormal noise levels
and loss weight, and sampled in sigma space (docs/edm.md).

python -m experiments.main --config=configs/digits_edm.py --workdir=workdirs/digits_edm
"""

from __future__ import annotations

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.diffusion.formulation = "edm"
    config.diffusion.sigma_data = 0.5
    config.diffusion.p_mean = -1.2
    config.diffusion.p_std = 1.2

    # EDM's deterministic sampler (Alg. 1) on Karras steps: 10 noise levels, 19 evaluations.
    config.sampling.sampler = "edm_heun"
    config.sampling.num_steps = 10
    config.sampling.timestep_spacing = "karras"
    config.sampling.sigma_min = 0.002
    config.sampling.sigma_max = 80.0
    config.sampling.rho = 7.0

    # No bits/dim for edm (the discrete-time likelihood is the ddpm formulation's).
    config.eval.bpd_num_images = 0
    return config
