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

    # Chosen by measurement (docs/samplers.md#digits-results-per-formulation, sample seeds 0 / 1):
    # DPM-Solver++(2M) SDE on Karras levels, 1.61 / 2.19 at 20 model evaluations (heun with 10
    # levels, 19 evaluations: 2.63 / 2.16); at 10 evaluations unipc is best (2.55 / 2.21).
    config.sampling.sampler = "dpm_solver++2m_sde"
    config.sampling.num_steps = 20
    config.sampling.timestep_spacing = "karras"
    config.sampling.sigma_min = 0.002
    config.sampling.sigma_max = 80.0
    config.sampling.rho = 7.0

    # No bits/dim for edm (the discrete-time likelihood is the ddpm formulation's).
    config.eval.bpd_num_images = 0
    return config
