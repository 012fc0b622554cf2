r"""The ddpm, edm and flow formulations crossed with three samplers at about 20 model
evaluations: 9 points, one workdir each (docs/samplers.md). Every sampler samples every
formulation, each on its own default grid (`sampling.timestep_spacing=''`).

    # once, for --eval's Frechet distance (the digits classifier's features of the train split)
    python -m experiments.reference_stats --dataset=digits --split=train --network=digits
    python -m experiments.sweep --config=configs/digits.py \
        --sweep=configs/sweeps/formulation_x_sampler.py \
        --workdir=workdirs/sweeps/formulation_x_sampler \
        --config.eval.bpd_num_images=0 --eval

bits/dim is off for every point (`--config.eval.bpd_num_images=0`): only the ddpm formulation
has the discrete-time bound. Training is deterministic, so the three points of one formulation
train the same model; to score many samplers on one trained run, `experiments.sampler_table`
is cheaper.

Points (in order, the sampler varying fastest) and their directories under --workdir:
formulation=ddpm,sampler=dpm_solver++2m_sde,num_steps=20
formulation=ddpm,sampler=heun,num_steps=10   (10 levels: 19 model evaluations)
formulation=ddpm,sampler=unipc,num_steps=20
... the same three for formulation=edm and formulation=flow.
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, product, sweep, zip_


def get_sweep() -> Sweep:
    return product(
        sweep("diffusion.formulation", ["ddpm", "edm", "flow"]),
        zip_(
            sweep("sampling.sampler", ["dpm_solver++2m_sde", "heun", "unipc"]),
            sweep("sampling.num_steps", [20, 10, 20]),
        ),
    )
