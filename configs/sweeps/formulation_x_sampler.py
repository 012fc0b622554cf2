r"""The ddpm vs edm formulation, each with two of its samplers at about 20 model evaluations:
4 points, one workdir each (docs/edm.md).

    # once, for --eval's Frechet distance (the digits classifier's features of the train split)
    python -m experiments.reference_stats --dataset=digits --split=train --network=digits
    python -m experiments.sweep --config=configs/digits.py \
        --sweep=configs/sweeps/formulation_x_sampler.py \
        --workdir=workdirs/sweeps/formulation_x_sampler \
        --config.eval.bpd_num_images=0 --eval

bits/dim is off for every point (`--config.eval.bpd_num_images=0`): the edm formulation has no
likelihood evaluation. A sampler belongs to one formulation (the edm_* samplers to 'edm'), so
the sweep pairs them (`zip_`) instead of crossing them. Training is deterministic, so the two
points of one formulation train the same model; to score many samplers on one trained run,
`experiments.sampler_table` is cheaper (docs/edm.md).

Points (in order) and their directories under --workdir:
formulation=ddpm,sampler=dpm_solver++2m_sde,timestep_spacing=linspace,num_steps=20
formulation=ddpm,sampler=heun,timestep_spacing=karras,num_steps=10
formulation=edm,sampler=edm_heun,timestep_spacing=karras,num_steps=10
formulation=edm,sampler=edm_dpm_solver++,timestep_spacing=karras,num_steps=20
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, sweep, zip_


def get_sweep() -> Sweep:
    return zip_(
        sweep("diffusion.formulation", ["ddpm", "ddpm", "edm", "edm"]),
        sweep("sampling.sampler", ["dpm_solver++2m_sde", "heun", "edm_heun", "edm_dpm_solver++"]),
        sweep("sampling.timestep_spacing", ["linspace", "karras", "karras", "karras"]),
        sweep("sampling.num_steps", [20, 10, 10, 20]),
    )
